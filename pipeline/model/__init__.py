"""LIP-VGG16 and its parts."""
from pipeline.model.attention import ECA, eca_kernel_size
from pipeline.model.lip import LIPLogit, LIPPool2d, lip2d
from pipeline.model.vgg import LIPVGG16, lip_vgg16

__all__ = ["ECA", "eca_kernel_size", "LIPLogit", "LIPPool2d", "lip2d", "LIPVGG16", "lip_vgg16"]
