"""Inspecting attention-based vision transformers: pure functions on model intermediates.

Nothing here builds a model. Inputs are the arrays returned by
`model.apply(variables, images_nhwc, return_intermediates=True)` (`out["intermediates"]`:
`attn` of shape `(L, B, K, T, T)` and `head_proj` of shape `(L, B, T, K, p)`, token 0 the CLS
token, then the patches in row-major grid order) or masks and maps derived from them.

Modules:

* `maps`: CLS attention maps per head, "key" features, DINO's attention-mass threshold,
  exact patch-grid -> pixel upsampling and pixel -> patch targets (jax.numpy).
* `segmentation`: PCA foreground and part colouring (CRATE/DINO demos), normalised cut and
  MaskCut (CutLER) object masks (numpy/scipy).
* `scores`: IoU, ROC AUC, COCO-style AP50 for instance masks, head-part consistency, head
  selection and no-model baselines (numpy/scipy).
"""
