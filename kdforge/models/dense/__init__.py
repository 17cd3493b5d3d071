"""Dense-prediction networks (segmentation, detection, enhancement, hashing heads) built on the zoo's backbones."""
