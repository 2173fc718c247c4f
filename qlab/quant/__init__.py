"""INT8 quantization: the power-of-two observer, qconfigs, PTQ and the QAT callback."""
