"""The architecture and its parts: the model as in the paper's figure (model), which CLIP tokens reach the mapper
(image_tokens), the backbones and every from_pretrained call (backbones), the demo's tiny pretraining (tiny_pretrain),
the freeze policy (freeze), the lean packed text path and CPU kernels (packed_text, cpu_kernels) and the frozen-feature
cache (feature_cache)."""
