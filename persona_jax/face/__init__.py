"""Faces: finding, aligning and embedding them, as the identity methods' official pipelines do.

* `align`: insightface's 5-point similarity alignment (`norm_crop`) onto the ArcFace template;
* `recognizer`: `Recognizer`, the interface every face-recognition network is used through
  (aligned crops -> raw embeddings; whole images' faces by their keypoints), and `cosine`;
* `recognition`: `load_recognizer` (insightface's ArcFace ONNX files, or the toy world's
  encoder folder) and the shipped toy recognizer;
* `iresnet`: ArcFace's IResNet in Flax, in its released files' form (batch norms folded);
* `onnx_iresnet`: `w600k_r50.onnx` / `glintr100.onnx` read into it by walking the ONNX graph;
* `detection`: SCRFD (`det_10g.onnx`, `scrfd_10g_bnkps.onnx`) on onnxruntime, CPU, with our
  letterbox, anchor decoding and NMS;
* `analysis`: `FaceAnalysis` over an insightface model pack folder (buffalo_l, antelopev2):
  detect, align, embed, and the face each pipeline picks (`PIPELINE_PICKS`);
* `extra`: the `face` extra's packages (onnx, onnxruntime), imported when first needed;
* `toy_network`: the toy identity encoder (ArcFace's stand-in in the toy world) and its files.
"""
