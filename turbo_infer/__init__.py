"""turbo_infer: the runtime — Wan DiT, attention backends, quantized linears, samplers, bundle
loader, pipeline and the `turbo-infer` CLI. Never imports lightning, deepspeed, webdataset, wandb
or turbo_train."""
