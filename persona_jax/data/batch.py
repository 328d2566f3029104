"""The keys of a training batch: numpy arrays with a leading batch axis, produced by the data
sources (data/pipeline.py, data/fastcomposer.py) and read by the step and the methods. Only the
keys a run needs are present.

  latent_mean, latent_logvar  [B, h, w, c]  cached VAE moments; a latent is sampled each step
  pixels                      [B, H, W, 3]  images in [-1, 1], VAE-encoded in the step (random crops)
  ids                         [B, L] int    token ids (the text encoder runs in the step)
  context                     [B, L, D]     cached text-encoder output (nothing in the text path trains)
  pooled                      [B, P]        SDXL: cached pooled output of text_encoder_2, beside `context`
  ids_2                       [B, L] int    SDXL: the second tokenizer's ids ("!" padding)
  time_ids                    [B, 6] float  micro-conditioning (SDXL reads it): the image's
                                            original size, its crop's top-left in the resized
                                            image and the target size, (H, W) order each
  prior                       [B] float     1 for class (prior-preservation) examples, 0 for instances
  mask                        [B, h, w, 1]  loss mask (or per-pixel weights): a mean over its area
  clip_pixels                 [B, S, S, 3]  the example's image for a CLIP image encoder
  subject_pixels              [B, K, S, S, 3]  FastComposer's subject crops (zeros where absent)
  subject_masks               [B, K, h, w]  FastComposer's subject masks
  subject_union               [B, h, w, 1]  FastComposer's denoising-loss mask (data/fastcomposer.py)
  blip_pixels                 [B, S, S, 3]  BLIP-Diffusion's subject input, normalized (data/blip_diffusion.py)
  category_ids, category_mask [B, C] int    BLIP-Diffusion's category: BERT ids and their mask
Sampling passes its inputs under the same names, plus `negative_ids` [B, L]; for SDXL also
  negative_ids_2              [B, L] int    the negative prompt's second tokenizer's ids
  negative_time_ids           [B, 6] float  the negative half's micro-conditioning
  negative_zero               [B] bool      the negative half is zeros (no negative prompt given,
                                            with force_zeros_for_empty_prompt)
"""

LATENT_MEAN, LATENT_LOGVAR, PIXELS = "latent_mean", "latent_logvar", "pixels"
IDS, CONTEXT, POOLED, MASK, PRIOR = "ids", "context", "pooled", "mask", "prior"
CLIP_PIXELS = "clip_pixels"
SUBJECT_PIXELS, SUBJECT_MASKS, SUBJECT_UNION = "subject_pixels", "subject_masks", "subject_union"
BLIP_PIXELS, CATEGORY_IDS, CATEGORY_MASK = "blip_pixels", "category_ids", "category_mask"
NEGATIVE_IDS = "negative_ids"
IDS_2, NEGATIVE_IDS_2 = "ids_2", "negative_ids_2"
TIME_IDS, NEGATIVE_TIME_IDS, NEGATIVE_ZERO = "time_ids", "negative_time_ids", "negative_zero"
