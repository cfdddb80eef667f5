"""q4_linear with AMX on and off: bit-identity against one-row products, and time per call."""
import sys, time
import torch
from clpdecode.backbone import kernels
from clpdecode.backbone.quant import Int4Weight, pack_tiles16

mod = kernels.load()
print("amx:", mod.has_amx(), file=sys.stderr)
op = torch.ops.clp.q4_linear
torch.manual_seed(0)
shapes = [(1536, 576), (3072, 576), (576, 1536)]  # N, K (qkv-ish, gate_up, down)
for n, k in shapes:
    w = Int4Weight.from_float(torch.randn(n, k) * 0.05)
    qs, d, m = pack_tiles16(w)
    x = torch.randn(70, k) * 2
    mod.set_amx(False)
    one = torch.cat([op(x[i:i+1], qs, d, m, None, None, 0.0, 0, None) for i in range(70)])
    mod.set_amx(True, 1)
    for rows in (1, 2, 5, 8, 15, 16, 17, 33, 64, 70):
        y = op(x[:rows], qs, d, m, None, None, 0.0, 0, None)
        assert torch.equal(y, one[:rows]), (n, k, rows, (y - one[:rows]).abs().max())
    line = [f"{n}x{k}"]
    for rows in (1, 2, 4, 8, 12, 16, 32, 64):
        t = {}
        for on in (False, True):
            mod.set_amx(on, 1)
            xs = x[:rows].clone()
            for _ in range(3): op(xs, qs, d, m, None, None, 0.0, 0, None)
            reps = max(5, 200 // rows)
            t0 = time.perf_counter()
            for _ in range(reps): op(xs, qs, d, m, None, None, 0.0, 0, None)
            t[on] = (time.perf_counter() - t0) / reps * 1e6
        line.append(f"M={rows}: vnni {t[False]:.0f} us, amx {t[True]:.0f} us ({t[False]/t[True]:.2f}x)")
    print(" | ".join(line))
print("bit-identical: yes")
