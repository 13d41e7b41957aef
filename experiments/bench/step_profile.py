"""Where the default scratch CNN's training step spends its time on the CPU at hand (torch.profiler).

Five steps of forward + backward + AdamW, batch 64, 96 px, channels_last, fp32 (what
``precision=auto`` picks on a CPU without native bf16); writes the operator table and the CPU facts.

    python experiments/bench/step_profile.py --out experiments/bench/step_profile.txt
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.profiler import ProfilerActivity, profile

from inat.config import ActConfig, FiltersConfig, ModelConfig
from inat.models import create_model
from inat.machine import cpu_features, cpu_model


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="experiments/bench/step_profile.txt")
    a = p.parse_args()
    torch.manual_seed(0)
    model = create_model(OmegaConf.structured(ModelConfig()), num_classes=10, image_size=96,
                         act=OmegaConf.structured(ActConfig()), filters=OmegaConf.structured(FiltersConfig()))
    model = model.to(memory_format=torch.channels_last).train()
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    x = torch.randn(64, 3, 96, 96).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (64,))

    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            step()
    capability = f"{torch.backends.cpu.get_cpu_capability()} ({' '.join(cpu_features())})"
    header = (f"# {cpu_model()}, torch {torch.__version__}, capability {capability}, "
              f"{torch.get_num_threads()} threads; 5 steps, batch 64, 96 px, fp32, channels_last\n")
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20)
    with open(a.out, "w") as f:
        f.write(header + table + "\n")
    print(header + table)


if __name__ == "__main__":
    main()
