"""The model's building blocks: attention (contiguous and paged), rotary, norms, plain and quantised linears,
MoE. Imports only torch and kernels/; model files use these and know nothing of loading or serving."""
