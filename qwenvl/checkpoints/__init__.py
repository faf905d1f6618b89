"""Files -> weights: safetensors folders, Hub ids, pre-quantised formats (AWQ, GPTQ, FP8), load-time
quantisation and huge pages. May import models/ and layers/; never the engine, server or CLI."""
