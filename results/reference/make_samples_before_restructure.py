"""Reference samples of the shipped checkpoints, made by the code before the restructuring (issue 15)."""
import platform, json, torch, sys
from safetensors.torch import save_file
from harness.checkpoints import load_model, text_encoder_name, RESULTS
from harness.latent import find_codec
from harness.pipeline import Chain, generate
from harness.text_encoder import load_text_encoder
torch.set_num_threads(2)
ck = RESULTS / "checkpoints"
base = load_model(ck / "pixel-base-tiny"); ssr = load_model(ck / "pixel-ssr-tiny"); lat = load_model(ck / "latent-unet-tiny")
text = load_text_encoder(text_encoder_name(base), max_length=base.spec.context_len)
prompts = ["a large red square moving left", "a small blue circle moving up"]
out = {}
for name, cfg in (("largest", base.space.largest()), ("smallest", base.space.smallest()), ("p40", base.space.subnet_at_fraction(0.4))):
    out[f"pixel-base/{name}"] = generate(Chain(base, None, text, cfg), prompts, steps=4, seed=3)
out["pixel-chain-32/p60"] = generate(Chain(base, ssr, text, base.space.subnet_at_fraction(0.6)), prompts[:1], 32, steps=3, seed=5)
out["latent/largest"] = generate(Chain(lat, None, None, codec=find_codec(lat)), ["", ""], steps=4, seed=7)
static = base.extract(base.space.subnet_at_fraction(0.8))
out["pixel-base/static-p80"] = generate(Chain(static, None, text), prompts, steps=4, seed=9)
meta = {"torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
        "cpu_model": open("/proc/cpuinfo").read().split("model name")[1].split("\n")[0].strip(": ")}
save_file({k: v.contiguous() for k, v in out.items()}, sys.argv[1], metadata={"provenance": json.dumps(meta)})
print(meta, {k: tuple(v.shape) for k, v in out.items()})
