"""turbo_infer: the runtime — Wan DiT, attention backends, quantized linears, samplers, bundle
loader, pipeline and the `turbo-infer` CLI. Never imports lightning, deepspeed, webdataset, wandb
or turbo_train."""
from turbo_infer import pycache as _pycache

# before anything of the runtime imports torch: read the bytecode `turbo-infer --prepare` compiled, if any
_pycache.activate()
