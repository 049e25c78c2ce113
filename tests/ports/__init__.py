"""PyTorch ports of the nets in crossval.caffe_side.zoo: correct and deliberately buggy."""
