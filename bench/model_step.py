"""Forward and training-step time of ICHPro per profile: now part of ``step_ratio.py``.

    .venv/bin/python bench/model_step.py [--profiles smoke cpu paper] [--batch 4] [--repeats 3]

``step_ratio.py`` prints what this script printed (parameters, forward time, forward + backward
time, peak resident memory; the paper profile with a random BERT-base and batch ``--paper-batch``)
next to the vision encoder's own step; this name is kept so that old command lines still work.
"""

import step_ratio

if __name__ == "__main__":
    step_ratio.main()
