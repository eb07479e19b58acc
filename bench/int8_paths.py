"""Which in-PyTorch int8 path: FX (torch.ao, what kdq uses) against torchao's pt2e, eager and compiled.

    pip install torchao==0.18.0   # not a kdq dependency; only this script needs it
    python bench/int8_paths.py runs/seed004/resnet20-student

Prints accuracy on 2,000 test images (a quick proxy, not the model's reported accuracy) and
images/s at batch 256 and at batch 1, each timed for 3 s after warm-up, for float and int8,
eager and under torch.compile. The README's "Why the FX path" table came from this script.
"""
import sys, time, warnings
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
warnings.filterwarnings("ignore")
import torch  # noqa: E402

try:
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer, get_default_x86_inductor_quantization_config)
except ImportError:
    sys.exit("bench/int8_paths.py needs torchao: pip install torchao==0.18.0")

import kdq  # noqa: E402
from kdq.quant import quantize_static  # noqa: E402
from kdq.rundir.load import load_model, renormalize  # noqa: E402

if len(sys.argv) != 2:
    sys.exit("usage: python bench/int8_paths.py RUN_DIR   (a float run of a zoo model)")
m, meta = load_model(sys.argv[1])
m.eval()
data = kdq.load_dataset(meta["dataset"], subset=2000)
data.train.x, data.test.x = renormalize(data.train.x, data, meta), renormalize(data.test.x, data, meta)
x = data.train.x[:512]
def tp(fn, b):
    xb = x[:b]
    with torch.inference_mode():
        for _ in range(3): fn(xb)
        t = time.perf_counter(); n = 0
        while time.perf_counter() - t < 3: fn(xb); n += 1
    return n * b / (time.perf_counter() - t)
test = data.test.x[:2000]; y = data.test.y[:2000]
acc = lambda f: (torch.cat([f(test[i:i+256]) for i in range(0, len(test), 256)]).argmax(1) == y).float().mean().item()
with torch.inference_mode():
    print("float eager", acc(m), round(tp(m, 256)), round(tp(m, 1)))
    fx = quantize_static(m, x)
    print("fx int8 eager", acc(fx), round(tp(fx, 256)), round(tp(fx, 1)))
ep = torch.export.export(m, (x[:2],), dynamic_shapes=({0: torch.export.Dim("b", max=4096)},)).module()
qz = X86InductorQuantizer(); qz.set_global(get_default_x86_inductor_quantization_config())
p = prepare_pt2e(ep, qz)
with torch.no_grad(): p(x)
c = convert_pt2e(p)
with torch.inference_mode():
    print("pt2e int8 eager (q/dq reference)", acc(c), round(tp(c, 256)), round(tp(c, 1)))
t = time.perf_counter()
with torch.inference_mode():
    cc = torch.compile(c); cc(x[:256]); cc(x[:1])
    print("compile time", round(time.perf_counter() - t), "s")
    print("pt2e int8 torch.compile", acc(cc), round(tp(cc, 256)), round(tp(cc, 1)))
    mc = torch.compile(m); mc(x[:256]); mc(x[:1])
    print("float torch.compile", acc(mc), round(tp(mc, 256)), round(tp(mc, 1)))
