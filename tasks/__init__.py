"""
The tasks: what a policy is asked, and the judge that scores its answer.

    common.py    Example (a prompt and what its judge needs) and gold_of (a judge's components -> one score)
    story.py     the RLHF chain's default task: continue a real story; gold judges what makes a good story
    instruct.py  TinyStoriesInstruct-style prompts (words, a sentence, dialogue, length) and their verifiers
    length.py    the seed's length experiment: the query sampler, the reward -|target - length| / 100, and the
                 learning-rate controller and stop diagnostics of its CPU recipe

The RLHF chain opens story and instruct with rlhf.common.load_task; train.py --ppo=True uses length.
"""
