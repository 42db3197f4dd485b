"""CAPI pretraining: masking, online clustering, heads, losses, EMA, schedules, parameter groups and the loop."""
