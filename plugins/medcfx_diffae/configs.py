"""Names and network settings of the diffae plugin, without torch (imported when the plugin registers)."""

METHOD = "diffae"
GRADER_METHOD = "diffae-grader"
DEMO_MODEL = "diffae-demo"
DEMO_GRADER = "diffae-grader-demo"
# inversion self-check: mean |x - reconstruction| in [0, 1] above which a case is flagged; about 1.5x the median
# over 32 demo test slices with diffae-demo:3 at the default 250 inversion / 100 decoding steps (median 0.0048,
# max 0.0052); docs/methods/diffae.md, "Counterfactual quality"
INVERSION_LIMIT = 0.0075

# the paper's setting (Atad et al. Table 7 / official DiffAE config at 96 px, scaled to medcfx's UNet)
PAPER_NETWORK = dict(in_channels=1, out_channels=1, image_size=96, model_channels=64, channel_mult=[1, 2, 4, 8],
                     num_res_blocks=2, attention_resolutions=[12], dropout=0.1, num_head_channels=64,
                     num_heads=0, resblock_updown=True, use_scale_shift_norm=True, z_sem_dim=512, num_groups=32)
PAPER_ENCODER = dict(in_channels=1, image_size=96, out_dim=512, model_channels=64, channel_mult=[1, 2, 4, 8],
                     num_res_blocks=2, attention_resolutions=[12], dropout=0.1, num_head_channels=64, num_heads=0,
                     resblock_updown=True, num_groups=32)
# the CPU demo: 48 px, 16 base channels (16-32-64), attention at 12 px, z_sem 256
DEMO_NETWORK = dict(in_channels=1, out_channels=1, image_size=48, model_channels=16, channel_mult=[1, 2, 4],
                    num_res_blocks=1, attention_resolutions=[12], dropout=0.0, num_head_channels=32, num_heads=0,
                    resblock_updown=True, use_scale_shift_norm=True, z_sem_dim=256, num_groups=8)
DEMO_ENCODER = dict(in_channels=1, image_size=48, out_dim=256, model_channels=16, channel_mult=[1, 2, 4],
                    num_res_blocks=1, attention_resolutions=[12], dropout=0.0, num_head_channels=32, num_heads=0,
                    resblock_updown=True, num_groups=8)

