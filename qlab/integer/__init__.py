"""The integer-only model: export of a po2 INT8 model (model.json + weights.npz) and a reference
executor that runs it with integer arithmetic and shift requantization."""
