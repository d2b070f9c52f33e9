"""Training on DeepSpeed: engine construction, the loop, LR schedules, logging and FLOPs/MFU."""
