"""Explain a real pretrained ImageNet model (EfficientNet-Lite0) on two bundled photos.

Run with ``make demo``. Prints the top prediction, then for each method the completeness receipt
(F(x), F(x'), sum of attributions, delta) and the most important 16x16 patch.
"""

import time

import torch

import nbattr
from nbattr.demo import imagenet_labels, imagenet_model, photo

torch.manual_seed(0)
model, labels = imagenet_model(), imagenet_labels()
x = torch.stack([photo("chelsea"), photo("coffee")])
with torch.no_grad():
    prob = model(x).softmax(1)
for i, (p, c) in enumerate(zip(*prob.max(1))):
    print(f"photo {i}: {labels[int(c)]} ({float(p):.2f})")

for method, opts in [("saliency", {}), ("gradient_x_input", {}),
                     ("integrated_gradients", {"steps": 32}),
                     ("interior_gradients", {"steps": 8, "rule": "riemann_right"}),
                     ("smoothgrad", {"samples": 16}), ("deeplift", {}), ("epsilon_lrp", {}),
                     ("occlusion", {"window": 32}), ("shapley_sampling", {"permutations": 2})]:
    if method not in nbattr.methods():
        continue
    t0 = time.perf_counter()
    r = nbattr.attribute(model, x, method=method, **opts)
    dt = time.perf_counter() - t0
    heat = r.attributions.abs().sum(1)  # pixel importance: sum over channels of |attribution|
    patches = torch.nn.functional.avg_pool2d(heat[:, None], 16)[:, 0]
    for i in range(x.shape[0]):
        k = int(patches[i].flatten().argmax())
        row, col = divmod(k, patches.shape[-1])
        receipt = f"sum={float(r.total()[i]):+.3f}"
        if r.delta is not None:
            receipt += (f" F(x)-F(x')={float(r.outputs[i] - r.baseline_outputs[i]):+.3f}"
                        f" delta={float(r.delta[i]):+.1e}")
        print(f"{method:22s} photo {i}: {receipt}  top patch at (y={row * 16}, x={col * 16})  [{dt:.1f}s]")
    if r.unsupported:
        print(f"{'':22s} operations without a rule: {r.unsupported}")
