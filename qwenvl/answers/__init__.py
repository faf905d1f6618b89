"""What a request gives back and how it is read: outputs, grounding boxes, drawing, reasoning split, OCR
post-processing. May import structured/ and inputs/; never the engine, server or CLI."""
