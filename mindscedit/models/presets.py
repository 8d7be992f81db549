"""UNet / VAE / CLIP configurations: the real Stable Diffusion shapes and tiny ones for tests.

The real configs let benchmarks and parameter counts run with random weights (speed, memory and
counts do not depend on the values); the tiny ones keep the architecture but shrink every width.
"""

SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
)

SD21_UNET = dict(
    SD15_UNET,
    sample_size=96,
    cross_attention_dim=1024,
    attention_head_dim=(5, 10, 20, 20),
    use_linear_projection=True,
)

# The mid-size config of the CPU benchmarks (see README, performance section).
MID_UNET = dict(
    SD15_UNET,
    sample_size=32,
    block_out_channels=(32, 64, 128, 128),
    cross_attention_dim=64,
    attention_head_dim=8,
)

TINY_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=(2, 4),
    norm_num_groups=32,
)

# An SDXL-shaped UNet at tiny widths: DownBlock2D first, linear projections, transformer depth per
# block, and the "text_time" added embedding (6 time ids of TINY_SDXL_TIME_DIM each + the pooled
# prompt). Its cross_attention_dim and projection input follow from the two tiny text encoders.
TINY_SDXL_TIME_DIM = 8

TINY_SDXL_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2),
    attention_head_dim=(2, 4),
    use_linear_projection=True,
    norm_num_groups=32,
    addition_embed_type="text_time",
    addition_time_embed_dim=TINY_SDXL_TIME_DIM,
)

# SDXL base 1.0's UNet (stabilityai/stable-diffusion-xl-base-1.0, unet/config.json): 2048-wide
# text states from the two encoders, and the "text_time" embedding of the pooled prompt (1280)
# and six time ids (256 each).
SDXL_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    norm_num_groups=32,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)

UNET_PRESETS = {"sd15": SD15_UNET, "sd21": SD21_UNET, "sdxl": SDXL_UNET, "mid": MID_UNET, "tiny": TINY_UNET}

TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    # Four blocks, so the latents are 1/8 of the image as in SD's VAE (CSC-Tuner hints rely on it).
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(32, 32, 32, 32),
    latent_channels=4,
    layers_per_block=1,
    norm_num_groups=32,
    sample_size=32,
    scaling_factor=0.18215,
)

TINY_CLIP_TEXT = dict(
    hidden_size=32,
    intermediate_size=37,
    num_attention_heads=4,
    num_hidden_layers=2,
    max_position_embeddings=77,
    projection_dim=32,
    hidden_act="quick_gelu",
)

# The second, larger text encoder of the tiny SDXL pipeline (CLIPTextModelWithProjection): sizes
# differ from the first one's so that a swapped or misordered encoder changes the shapes.
TINY_CLIP_TEXT_2 = dict(
    TINY_CLIP_TEXT,
    hidden_size=40,
    intermediate_size=47,
    projection_dim=16,
    hidden_act="gelu",
)

# DDPM training schedule of SD1.x/2.x (scaled_linear betas 0.00085..0.012 over 1000 steps).
SD_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    steps_offset=1,
    prediction_type="epsilon",
)

# SDXL's EulerDiscreteScheduler config (same betas; leading timestep spacing).
SDXL_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
    timestep_spacing="leading",
    prediction_type="epsilon",
)

# Playground v2.5's EDMDPMSolverMultistepScheduler config (EDM sigmas, Karras schedule, 2nd-order DPM-Solver++).
PLAYGROUND_SCHEDULER = dict(
    sigma_min=0.002,
    sigma_max=80.0,
    sigma_data=0.5,
    sigma_schedule="karras",
    rho=7.0,
    num_train_timesteps=1000,
    prediction_type="epsilon",
    solver_order=2,
    algorithm_type="dpmsolver++",
    solver_type="midpoint",
    lower_order_final=True,
    euler_at_final=False,
    final_sigmas_type="zero",
)

# Playground v2.5's VAE latent statistics: z = (x - mean) * scaling_factor / std per channel.
PLAYGROUND_VAE_LATENTS = dict(
    scaling_factor=0.5,
    latents_mean=[-1.6574, 1.886, -1.383, 2.5155],
    latents_std=[8.4927, 5.9022, 6.5498, 5.2299],
)


def unet_preset(name: str) -> dict:
    try:
        return dict(UNET_PRESETS[name])
    except KeyError:
        raise ValueError(f"unknown model_config '{name}': choose one of {', '.join(UNET_PRESETS)}") from None
