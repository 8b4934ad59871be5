"""The embedding model's forward pass as a self-contained package (standard library, torch, transformers).

embforge imports these files; :meth:`embforge.models.embedder.Embedder.save` copies them, whole
and flat, into every embforge model folder, where transformers' remote-code loader (and
sentence-transformers through it) follows their relative imports:

- ``modeling_embforge.py``: ``EmbforgeConfig``, ``EmbforgeModel``, ``EmbforgeSTModule`` (the entry point);
- ``head.py``: ``HeadSpec``, the one description of an embedding head (standard library only);
- ``embedding.py``: the embedding, defined once (backbone -> pooling -> normalisation);
- ``attention.py``: bidirectional / causal attention of decoders on padded batches;
- ``packing.py``: unpadded (packed) batches and their variable-length attention;
- ``pooling.py``: mean / cls / last, NV-Embed's latent attention, self-attention;
- ``rotary.py``: nomic-bert's stateless dynamic-NTK rotary embedding;
- ``tokenization.py``: the one tokeniser and padder (standard library only);
- ``lora.py``: a LoRA adapter kept apart in the folder, merged when it loads.

This file is not copied, and imports nothing: ``embforge.modeling.head`` and
``embforge.modeling.tokenization`` load without torch (the ONNX Runtime path).
"""

MODELING_FILES = (
    "modeling_embforge.py",
    "head.py",
    "embedding.py",
    "attention.py",
    "packing.py",
    "pooling.py",
    "rotary.py",
    "tokenization.py",
    "lora.py",
)
ENTRY_MODULE = "modeling_embforge"  # auto_map / modules.json name the classes in this file
