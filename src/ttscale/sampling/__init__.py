from ttscale.sampling.params import GREEDY, SamplingParams

__all__ = ["GREEDY", "SamplingParams"]
