"""Parameter-efficient tuners: pure Cells (tuner math) and their injection into a diffusers UNet."""
