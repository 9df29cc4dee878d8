import io

from pipelines.common import ray_data_progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_ray_data_progress_bars_only_on_a_terminal():
    from ray.data import DataContext

    context = DataContext.get_current()
    try:
        assert ray_data_progress(io.StringIO()) is False
        assert not context.enable_progress_bars and not context.enable_operator_progress_bars
        assert ray_data_progress(_Terminal()) is True
        assert context.enable_progress_bars and context.enable_operator_progress_bars
    finally:
        context.enable_progress_bars = context.enable_operator_progress_bars = True
