"""The compute levers do what they claim: progressive resizing, the linear schedule, D4 test-time averaging,
and the FLOP count they are judged by."""

from __future__ import annotations

import base64

import mlflow
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image
from torch import nn

from smids_ml.compute import step_flops, training_flops
from smids_ml.config import TrainConfig
from smids_ml.data import Batches, augment_batch
from smids_ml.engine import epoch_sizes, make_scheduler
from smids_ml.models import D4Average, build_for
from smids_ml.train import train
from tests.conftest import TINY


def test_progressive_resizing_ramps_from_the_small_side_to_full_size_by_three_quarters():
    sizes = epoch_sizes(TrainConfig(epochs=20, image_size=96, progressive_start=0.5))
    assert sizes[0] == 48 and sizes == sorted(sizes)
    assert all(s % 8 == 0 for s in sizes)
    assert sizes[14:] == [96] * 6 and 48 < sizes[9] < 96  # full size from three quarters of the schedule on
    assert epoch_sizes(TrainConfig(epochs=5, image_size=96)) == [96] * 5


def test_progressive_training_runs_the_early_epochs_smaller_and_logs_each_epochs_side(tracking, synth_data):
    cfg = TrainConfig(data=str(synth_data), **{**TINY, "model": "smids_resnet", "epochs": 4, "image_size": 48,
                                               "progressive_start": 0.67}).validate()
    result = train(cfg, experiment=tracking)
    cfg = result.cfg  # with the channels decided from the data
    assert [e["image_size"] for e in result.history.epochs] == [32, 40, 48, 48]
    history = MlflowClient().get_metric_history(result.run_id, "image_size")
    assert [m.value for m in history] == [32, 40, 48, 48]
    # the counted compute follows the smaller early epochs
    run = MlflowClient().get_run(result.run_id)
    full = training_flops(cfg.replace(progressive_start=0), 3, int(run.data.params["n_train"]))
    assert run.data.metrics["train_tflop"] * 1e12 == pytest.approx(training_flops(cfg, 3, int(run.data.params["n_train"])))
    assert run.data.metrics["train_tflop"] * 1e12 < 0.85 * full


def test_networks_with_a_fixed_size_classifier_train_at_full_size_and_bad_starts_are_refused():
    assert epoch_sizes(TrainConfig(model="improved_cnn", progressive_start=0.5, image_size=64, epochs=4)) == [64] * 4
    assert epoch_sizes(TrainConfig(progressive_start=0.1, image_size=64, epochs=8))[0] == 16  # never below 16 px
    with pytest.raises(Exception, match="--progressive-start must be in \\[0, 1\\]"):
        TrainConfig(progressive_start=1.5).validate()


def test_linear_schedule_warms_up_then_falls_in_a_straight_line_to_zero():
    weight = nn.Parameter(torch.zeros(1))
    cfg = TrainConfig(epochs=10, warmup_epochs=1, lr=1.0, scheduler="linear")
    optimizer = torch.optim.SGD([weight], lr=cfg.lr)
    scheduler, per_step = make_scheduler(optimizer, cfg, steps_per_epoch=10)
    rates = []
    for _ in range(100):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert per_step and max(rates) == pytest.approx(1.0) and rates.index(max(rates)) == 9
    falls = [a - b for a, b in zip(rates[9:], rates[10:])]
    assert max(falls) == pytest.approx(min(falls), rel=1e-3)  # a straight line, not a cosine
    assert rates[-1] < 0.02


def test_d4_averaging_is_invariant_to_the_squares_symmetries_and_trains_on_one_view():
    torch.manual_seed(0)
    cfg = TrainConfig(model="smids_resnet", image_size=32, channels=3, tta="d4", width=8)
    network = build_for(cfg, 3)
    assert isinstance(network, D4Average)
    network.eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits = network(images)
        for view in (torch.rot90(images, 1, (2, 3)), images.flip(3), torch.rot90(images.flip(2), 3, (2, 3))):
            torch.testing.assert_close(network(view), logits, atol=1e-5, rtol=1e-4)
        single = network.network(images)
    assert not torch.allclose(single, logits, atol=1e-4)
    network.train()
    assert network(images).shape == (2, 3)  # one view while training


def test_a_d4_model_serves_the_same_answer_for_a_rotated_crop(tracking, synth_data, tmp_path):
    cfg = TrainConfig(data=str(synth_data), **{**TINY, "model": "smids_resnet", "tta": "d4"}).validate()
    result = train(cfg, experiment=tracking)
    source = sorted(synth_data.rglob("*.bmp"))[0]
    square = Image.open(source).convert("RGB").resize((48, 48))
    files = [tmp_path / "a.png", tmp_path / "b.png"]
    square.save(files[0])
    square.transpose(Image.Transpose.ROTATE_90).save(files[1])
    model = mlflow.pyfunc.load_model(result.model_uri)
    out = model.predict(pd.DataFrame({"image": [base64.b64encode(f.read_bytes()).decode() for f in files]}))
    torch.testing.assert_close(torch.tensor(out[result.dataset.classes].to_numpy()[0]),
                               torch.tensor(out[result.dataset.classes].to_numpy()[1]), atol=1e-4, rtol=1e-3)


def test_a_stored_config_without_the_new_fields_means_no_test_time_averaging():
    stored = TrainConfig().to_dict()
    for key in ("tta", "progressive_start", "orientations"):
        stored.pop(key)
    loaded = TrainConfig.from_dict(stored)
    assert (loaded.tta, loaded.progressive_start, loaded.orientations) == ("none", 0.0, "random")


def test_flop_count_agrees_with_a_hand_count():
    network = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.Flatten(), nn.Linear(4 * 8 * 8, 5, bias=False))
    conv = 2 * (8 * 8) * 4 * 3 * 3 * 3  # multiply-adds of each output element
    linear = 2 * 256 * 5
    # backward: the weight gradients of both layers and the linear layer's input gradient (the images need none)
    assert step_flops(network, 3, 8) == conv + linear + conv + 2 * linear
    cfg = TrainConfig(model="smids_resnet", image_size=32, channels=3, epochs=3, width=8)
    assert training_flops(cfg, 3, 10) == pytest.approx(3 * 10 * step_flops(build_for(cfg, 3), 3, 32))


def test_orientation_cycling_shows_each_crop_every_orientation_within_8_epochs():
    images = torch.randint(0, 256, (10, 3, 16, 16), dtype=torch.uint8)
    batches = Batches(images, torch.zeros(10, dtype=torch.long), batch=4, shuffle=True, augment=True, cycle=True)
    seen = {i: set() for i in range(10)}
    for _ in range(8):
        for i in range(10):
            seen[i].add(int(batches.turns(torch.tensor([i]))))
        for _ in batches:
            pass
    assert all(turns == set(range(8)) for turns in seen.values())
    assert Batches(images, torch.zeros(10, dtype=torch.long), batch=4, augment=True).turns(torch.tensor([0])) is None


def test_a_quarter_turn_of_the_cycle_is_the_crop_turned_by_90_degrees():
    images = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)

    def turned(k: int) -> torch.Tensor:  # the same random residual angle for every k: the same seed
        return augment_batch(images, torch.Generator().manual_seed(0), strength=0.0, scale_shift=0.0,
                             turns=torch.full((3,), k))

    for k in range(1, 4):
        torch.testing.assert_close(turned(k), torch.rot90(turned(0), k, (2, 3)), atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(turned(4), turned(0).flip(3), atol=1e-3, rtol=1e-3)


def test_a_depthwise_convolution_is_counted_by_its_groups():
    network = nn.Sequential(nn.Conv2d(3, 8, 1, bias=False), nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False))
    pointwise = 2 * 8 * 8 * 8 * 3  # per image at 8×8: outputs × inputs per output × 2
    depthwise = 2 * 8 * 8 * 8 * 9
    # backward: both weight gradients, and the depthwise layer's input gradient (torch's own formula counts
    # the depthwise backward as if it were a dense 8→8 convolution)
    assert step_flops(network, 3, 8) == pointwise + depthwise + pointwise + 2 * depthwise


def test_preset_fast_is_the_plain_stem_at_64_px_for_150_epochs_with_test_time_averaging():
    fast, default = TrainConfig.from_preset("fast"), TrainConfig()
    assert (fast.image_size, fast.epochs, fast.tta) == (64, 150, "d4")
    changed = {k for k, v in fast.to_dict().items() if v != default.to_dict()[k]}
    assert changed == {"preset", "stem", "image_size", "epochs", "tta"} and fast.stem == "conv"


def test_preset_long_is_the_previous_defaults_at_five_times_the_compute_of_todays():
    long, default = TrainConfig.from_preset("long"), TrainConfig()
    assert (long.stem, long.epochs, long.tta) == ("conv", 200, "none")
    changed = {k for k, v in long.to_dict().items() if v != default.to_dict()[k]}
    assert changed == {"preset", "stem", "epochs"}
    # on a SMIDS fold (colour crops of ~176 px, ~1,440 training crops) the defaults choose 96 px, 3 channels, 155 epochs
    smids_fold = {"image_size": 96, "channels": 3}
    default, long = default.replace(**smids_fold, epochs=155), long.replace(**smids_fold)
    assert training_flops(default, 3, 1000) <= training_flops(long, 3, 1000) / 5


def test_a_pooled_stem_runs_every_stage_at_a_quarter_of_the_positions_for_a_quarter_of_their_compute():
    plain, pooled = (build_for(TrainConfig(image_size=64, channels=3, width=8, stem=stem), 3).eval() for stem in ("conv", "pool"))
    x = torch.randn(2, 3, 64, 64)
    assert plain.features(x).shape[-1] == 4 and pooled.features(x).shape[-1] == 2
    stem_flops = 2 * 32 * 32 * 8 * 27  # forward of the stem at half the side; the rest shrinks fourfold
    plain_rest = step_flops(plain, 3, 64) - 2 * stem_flops  # stem: forward and weight gradient
    assert step_flops(pooled, 3, 64) - 2 * stem_flops == pytest.approx(plain_rest / 4, rel=0.02)
    stored = {k: v for k, v in TrainConfig(stem="pool").to_dict().items() if k != "stem"}
    assert TrainConfig.from_dict(stored).stem == "conv"  # a model logged before the option stays as it was trained


@pytest.mark.parametrize("stem, kernel, reached", [
    ("patch", 4, [[1, 2]]),  # non-overlapping 4×4 patches: a pixel reaches its own patch's position only
    ("overlap", 7, [[1, 2], [1, 3], [2, 2], [2, 3]]),  # 7×7 windows at stride 4: two rows and two columns of them
])
def test_a_stride_4_stem_reaches_the_pooled_stems_map_in_one_convolution(stem, kernel, reached):
    pooled, strided = (build_for(TrainConfig(image_size=64, channels=3, width=8, stem=s), 3).eval() for s in ("pool", stem))
    x = torch.randn(2, 3, 64, 64)
    first = strided.features[0]
    assert (first.kernel_size, first.stride) == ((kernel, kernel), (4, 4))
    assert first(x).shape[-1] == 16 and strided.features(x).shape == pooled.features(x).shape
    # no half-size map: the stem's forward and weight gradient at 16×16 instead of 32×32; the stages are the same
    pooled_stem, strided_stem = 2 * 32 * 32 * 8 * 27, 2 * 16 * 16 * 8 * 3 * kernel ** 2
    assert step_flops(strided, 3, 64) - 2 * strided_stem == pytest.approx(step_flops(pooled, 3, 64) - 2 * pooled_stem)
    y = x.clone()
    y[:, :, 5, 9] += 1
    changed = (first(y) - first(x)).abs().sum((0, 1)) > 0
    assert changed.nonzero().tolist() == reached


def test_the_fused_optimizer_takes_the_same_step_as_torchs_loop_over_parameters():
    from smids_ml.engine import make_optimizer
    for name in ("AdamW", "Adam", "SGD"):
        cfg = TrainConfig(optimizer=name, image_size=32, channels=3, width=8)
        models = [build_for(cfg, 3).eval() for _ in range(2)]  # eval: no dropout draws to tell them apart
        models[1].load_state_dict(models[0].state_dict())
        fused, looped = make_optimizer(models[0], cfg), make_optimizer(models[1], cfg)
        assert fused.param_groups[0]["fused"]
        looped.param_groups[0]["fused"] = None  # torch's per-parameter loop
        x = torch.randn(4, 3, 32, 32)
        for model, optimizer in zip(models, (fused, looped)):
            for _ in range(3):
                optimizer.zero_grad()
                model(x).square().mean().backward()
                optimizer.step()
        for a, b in zip(*(m.parameters() for m in models)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
