"""Google's V-MoE checkpoints (google-research/vmoe) by role: `readers` (the sharded and Flax msgpack files),
`params` (the parameter tree -> `VMoEForImageClassification` state dict) and `config` (vmoe model configs and
presets -> `VMoEConfig`). `hf_vmoe.integrations.convert_vmoe` ties them into `convert_vmoe_checkpoint` and the
`hf-vmoe convert-vmoe` command.
"""
