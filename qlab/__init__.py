"""qlab: train a quantizable ResNet-50 on CIFAR-10, then make INT8 models by PTQ and QAT."""

__version__ = "0.1.0"
