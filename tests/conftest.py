"""Test-session settings: one torch thread, so timings do not depend on test order or load
(tiny models gain nothing from a second thread and lose a lot when cores are shared)."""

import torch

torch.set_num_threads(1)
