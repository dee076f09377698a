"""Register a user pattern and watch it fire under backend="gla".

The pattern is ordinary PyTorch (it is also the numerical reference); the replacement takes the
same parameters. gla verifies the rewrite on random inputs before it applies it.
"""
import torch

import gla


def hard_swish_fused(x):
    # stands in for a user's fused kernel: same function, one op
    return torch.nn.functional.hardswish(x)


def main():
    with gla.pattern_scope():
        @gla.register_pattern(replacement=hard_swish_fused, description="x * relu6(x + 3) / 6")
        def hard_swish(x):
            return x * torch.clamp(x + 3, 0, 6) / 6

        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Hardswish(), torch.nn.Linear(32, 4))

        def handwritten(x):
            h = model[0](x)
            return model[2](h * torch.clamp(h + 3, 0, 6) / 6)

        x = torch.randn(8, 16)
        report = gla.explain(handwritten, x, options={"inner": "aot_eager"})
        print(report)
        assert report.counts["custom"] == 1
        out = torch.compile(handwritten, backend="gla", options={"inner": "aot_eager"})(x)
        print("max |gla - eager| =", (out - handwritten(x)).abs().max().item())


if __name__ == "__main__":
    main()
