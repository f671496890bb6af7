"""What a training run needs around its loop: progress, saves, Ctrl-C, and an exact resume.

The loop itself is in the scripts (train.py, lora_finetune.py); `Run.steps` hands it one step at a time
and, between steps:

  * shows a progress bar, and reads the loss back to the host once every 50 steps (and once an epoch,
    all of them), so the GPU never waits on Python; a loss that turns NaN or infinite stops the run there,
    before anything is saved;
  * saves after every epoch and at the end;
  * turns Ctrl-C into "stop after this step": the step in flight finishes, the run is saved and the
    KeyboardInterrupt is passed on. A step is never cut in half, so the saved weights, optimizer and
    random-number state are exactly those after a whole step, and --resume continues bit for bit as if
    the run had never stopped. A second Ctrl-C during the save is held until the save is done.
"""
import math
import signal
import threading
import time
from contextlib import contextmanager

import torch
from tqdm import tqdm


class NonFiniteLoss(ValueError):
    """The loss became NaN or infinite: training stopped and nothing was saved."""


def rng_state(device):
    """Every random-number state a training step draws from: the CPU's and, on a GPU, the GPU's."""
    state = dict(cpu=torch.get_rng_state())
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device):
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


@contextmanager
def ctrl_c_held():
    """Inside, Ctrl-C (SIGINT) only sets a flag: `pressed()` says whether it came. Outside the main thread,
    where Python cannot take signals, it does nothing."""
    pressed = []
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    previous = signal.signal(signal.SIGINT, lambda *_: pressed.append(True))
    try:
        yield lambda: bool(pressed)
    finally:
        signal.signal(signal.SIGINT, previous)


def save_uninterrupted(save, *args):
    """Run save(*args) with Ctrl-C held back until it is done, then pass a Ctrl-C that came on."""
    with ctrl_c_held() as pressed:
        save(*args)
    if pressed():
        raise KeyboardInterrupt


def _check_finite(values, step):
    if not all(math.isfinite(v) for v in values):
        raise NonFiniteLoss(f"the loss became non-finite by step {step}; nothing was saved "
                            "(the learning rate is probably too high: try a lower --lr)")


class Run:
    """One invocation of a training run, from step `start` to `stop` of a planned `total`.

    `save(step, losses, seconds)` writes everything needed to continue; `losses` and `seconds` are those
    of earlier invocations (a resumed run), and grow.
    """

    def __init__(self, save, start, stop, total, steps_per_epoch, losses=(), seconds=0.0, desc="train"):
        self.save, self.start, self.stop, self.total = save, start, stop, total
        self.steps_per_epoch, self.desc = steps_per_epoch, desc
        self.losses, self.seconds = list(losses), seconds
        self.pending = []  # this epoch's losses, still on the device

    def record(self, loss):
        self.pending.append(loss)

    def steps(self, batches):
        """Yield (step, (x_0, y)) from `start` to `stop`, doing between steps what the docstring above says."""
        t0 = time.time()
        with ctrl_c_held() as pressed, tqdm(total=self.stop, initial=self.start, desc=self.desc, unit="step",
                                            dynamic_ncols=True) as bar:
            for step, batch in zip(range(self.start, self.stop), batches):
                yield step, batch
                done = step + 1
                bar.update()
                if done % 50 == 0 and self.pending:
                    value = self.pending[-1].item()  # one host sync per 50 steps
                    _check_finite([value], done)
                    bar.set_postfix(loss=f"{value:.4f}")
                if done % self.steps_per_epoch == 0 or done == self.stop or pressed():
                    epoch_losses = torch.stack(self.pending).tolist() if self.pending else []  # one copy
                    _check_finite(epoch_losses, done)
                    self.losses += epoch_losses
                    self.pending = []
                    self.seconds += time.time() - t0
                    t0 = time.time()
                    if pressed():
                        tqdm.write(f"interrupted after step {done}: saving a checkpoint to resume from")
                    elif epoch_losses:
                        tqdm.write(f"{self.desc} epoch {math.ceil(done / self.steps_per_epoch)}: mean loss "
                                   f"{sum(epoch_losses) / len(epoch_losses):.4f}, step {done}/{self.total}")
                    self.save(done, self.losses, self.seconds)  # Ctrl-C is held here too
                    if pressed():
                        raise KeyboardInterrupt


def plan_steps(n_images, config):
    """Optimizer steps of the planned run: `config.total_steps`, or `epochs` passes of whole batches."""
    steps_per_epoch = n_images // config.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"batch size {config.batch_size} is larger than the data set ({n_images} images)")
    return config.total_steps or config.epochs * steps_per_epoch


def plan_run(n_images, config, max_steps, saved_step=None):
    """(total_steps, stop_at): the planned run's length and where this invocation stops (--max-steps)."""
    total_steps = plan_steps(n_images, config)
    if max_steps and max_steps > total_steps:
        raise ValueError(f"--max-steps {max_steps} is past the end of the planned run ({total_steps} steps): "
                         "raise --epochs or --total-steps to plan a longer one")
    stop_at = max_steps or total_steps
    if saved_step is not None and stop_at <= saved_step:
        raise ValueError(f"the saved run is already at step {saved_step}: give --max-steps above it "
                         f"(the planned run has {total_steps})")
    return total_steps, stop_at


def training_state(step, losses, seconds, device):
    """What every save holds besides the weights, so that --resume goes on exactly where it stopped."""
    return dict(step=step, losses=list(losses), seconds=seconds, rng=rng_state(device))


def restore(saved, optimizer, device):
    """Put a saved run's optimizer and random-number state back; returns (step, losses, seconds)."""
    optimizer.load_state_dict(saved["optimizer"])
    set_rng_state(saved["rng"], device)
    return saved["step"], saved["losses"], saved["seconds"]
