"""The collapse warning: a memory whose share of the routed slots stays under train.collapse_share x
its balanced share for train.collapse_logs logged steps in a row is named once (and again only
after it recovered and collapsed anew)."""
import logging
from types import SimpleNamespace

from megamom.config import Config
from megamom.train.trainer import Trainer


def test_a_memory_under_the_floor_for_n_logs_is_named_once(caplog):
    cfg = Config()
    cfg.train.collapse_share, cfg.train.collapse_logs = 0.1, 3
    me = SimpleNamespace(cfg=cfg, _low_share={}, dist=SimpleNamespace(is_main=True))
    low = [[0.5, 0.49, 0.01, 0.0], [0.25] * 4]  # layer 0: memories 2 (1% < 2.5%) and 3 collapsed
    with caplog.at_level(logging.WARNING, logger="megamom.train"):
        for _ in range(5):
            Trainer._watch_collapse(me, low)
        Trainer._watch_collapse(me, [[0.25] * 4, [0.25] * 4])  # recovered ...
        for _ in range(3):
            Trainer._watch_collapse(me, low)  # ... and collapsed again
    named = [r.getMessage() for r in caplog.records]
    assert len(named) == 4, named
    assert sum("memory 2 of layer 0" in m for m in named) == 2
    assert sum("memory 3 of layer 0" in m for m in named) == 2
    assert all("model.aux_loss_coef" in m for m in named)
