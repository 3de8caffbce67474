"""r3v_fast: a fast engine for R³V self-training of vision-language models.

R³V (Cheng et al., NAACL 2025, arXiv 2411.00855) lets a VLM improve its own chain-of-thought
by sampling rationales, keeping the right ones, learning to refine wrong ones into right ones
and learning to select the right answer among its own candidates. This package runs that
loop (``python -m r3v_fast.train``) and supplies the kernels that make it cheap: a fused
segment log-likelihood, tree packing and shared-prefix sampling.
"""

__version__ = "0.1.0"
