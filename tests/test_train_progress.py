"""Training progress lines: step of total, loss, samples/s and the time left measured on the driver."""
import io

from flows.train_progress import ProgressPrinter, clock


def _row(step, loss=2.5, total=400, sps=812.4):
    return {"step": step, "total": total, "loss": loss, "samples_per_s": sps}


def test_time_left_comes_from_the_steps_seen_on_the_driver():
    now = [100.0]
    out = io.StringIO()
    printer = ProgressPrinter(out, clock_fn=lambda: now[0])
    printer.show(_row(10), ["precision auto -> fp32 (cpu without AMX/AVX512-BF16)"])
    now[0] = 120.0  # 20 s for 40 steps: 0.5 s a step, 350 steps left
    printer.show(_row(50, loss=2.123), [])
    printer.show(_row(50, loss=2.123), [])  # no new step: no new line
    now[0] = 300.0
    printer.show(_row(400, loss=1.0), [])
    assert out.getvalue().splitlines() == [
        "train: precision auto -> fp32 (cpu without AMX/AVX512-BF16)",
        "train: step 10/400  loss 2.500  812 samples/s",
        "train: step 50/400  loss 2.123  812 samples/s  2:55 left",
        "train: step 400/400  loss 1.000  812 samples/s  done"]


def test_a_resumed_run_measures_from_its_first_step_seen():
    now = [0.0]
    printer = ProgressPrinter(io.StringIO(), clock_fn=lambda: now[0])
    printer.show(_row(300, total=400), [])
    now[0] = 10.0
    assert printer.line(_row(310, total=400), now[0]).endswith("1:30 left")  # 1 s a step, 90 left


def test_clock():
    assert (clock(41), clock(725), clock(3727), clock(-3)) == ("0:41", "12:05", "1:02:07", "0:00")
