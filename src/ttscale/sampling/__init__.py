from ttscale.sampling.params import GREEDY, SamplingParams, SamplingParamsError

__all__ = ["GREEDY", "SamplingParams", "SamplingParamsError"]
