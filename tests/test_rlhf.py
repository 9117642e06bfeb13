"""The RLHF chain: the story task's gold components on hand-written stories, the instruction task's verifiers and
relabelling, the task interface on both tasks, the losses (pairwise reward model, DPO, GRPO advantages, best-of-n
expectation) against hand-computed values, the reward read at the last real token, and a tiny seeded run of every
stage on the story task."""
import itertools
import json
import math
import os
import random
import re

import pytest
import torch

from conftest import REPO, first_difference, killed_run, logged, run, run_in_process, shared_path, stage
from model import ModelArgs, TransformerWithValueHead
from ppo import aggregate, clipped_policy_loss
from rlhf.common import (Reference, best_of_n_kl_bound, best_of_n_weights, dpo_loss, group_advantages, make_batch,
                         pad_right, pairwise_loss, preference_pairs, response_logprobs, reward_scores, rm_sequence,
                         sequence_logprobs)
from stats import bootstrap_ci, pair_accuracy, paired_diff_ci, spearman
from tasks.instruct import (InstructData, WordStats, constraint_scores, gold, has_dialogue, prompt_text, relabel,
                            score_length, score_sentence, score_words, sentences_of, stem)

STORY = ('Once upon a time, Lily jumped over the puddles. She was happier than ever. "Look, Mom!" she said. '
         'The sun shone on the shiny trees and Lily hopped home.')


# -----------------------------------------------------------------------------
# the story task's gold components, on hand-written stories

def test_utterance_needs_three_words_in_either_kind_of_quotes():
    from tasks.story import has_utterance
    assert has_utterance('Lily said, "I love my red ball." Then she ran.')
    assert has_utterance("Tom shouted, \u201cLook at the big dog!\u201d")
    assert not has_utterance('Mom said, "Yes." Tom said "No way".')  # one and two words
    assert has_utterance('"Yes," said Mom. "We can\'t go now," said Dad.')  # the second has three words
    assert not has_utterance("There are no quotes here at all, only a long sentence.")
    assert not has_utterance('An open quote " that never closes and goes on and on')


def test_happy_ending_reads_the_last_sentence_only():
    from tasks.story import happy_ending
    assert happy_ending("The dog ran away. Then it came back and they were happy.")
    assert happy_ending('They hugged and went home. "I love you," said Mom.')  # "love" in the last sentence
    assert not happy_ending("They were happy. Then the rain came and the dog was lost.")  # happy, but not at the end
    assert not happy_ending("The ball was red.")
    assert not happy_ending("")
    assert happy_ending("In the end, they became best friends!")


def test_keeps_character_and_names_in_the_prompt():
    from tasks.story import keeps_character, prompt_names
    names = {"Lily", "Tom", "Ben"}
    assert prompt_names("Once upon a time, there was a girl named Lily", True, names) == ["Lily"]
    assert prompt_names("Once upon a time, there was a girl named Lily", False, names) == []  # maybe cut: Lily|anna
    assert prompt_names("Tom and Ben went to the park. The", False, names) == ["Ben", "Tom"]
    assert prompt_names("", True, names) == []
    assert keeps_character(["Lily"], " She played with Lily's ball. Lily smiled.")
    assert keeps_character(["Tom", "Ben"], " Ben was sad.")
    assert not keeps_character(["Lily"], " The girl played with a lily in the garden.")  # case matters for names
    assert not keeps_character(["Lily"], " She played with Lilyanne.")  # whole words only


def test_fluency_repetition_and_completeness_anchors():
    from tasks.story import FLUENT_ANCHORS, MIN_STORY_TOKENS, REPETITION_ZERO, complete, fluency, not_repetitive
    lo, hi = FLUENT_ANCHORS
    assert fluency(lo) == 1.0 and fluency(lo - 0.5) == 1.0 and fluency(hi) == 0.0 and fluency(hi + 1) == 0.0
    assert fluency((lo + hi) / 2) == pytest.approx(0.5)
    assert not_repetitive(list(range(50))) == 1.0  # no 3-gram repeats
    loop = [5, 6, 7] * 20  # 58 3-grams, 3 distinct: rate 55/58, far past the zero point
    assert not_repetitive(loop) == 0.0
    half = list(range(40)) + list(range(10))  # 48 3-grams, 8 repeated
    assert not_repetitive(half) == pytest.approx(1 - (8 / 48) / REPETITION_ZERO)
    assert complete(True, MIN_STORY_TOKENS) and not complete(True, MIN_STORY_TOKENS - 1)
    assert not complete(False, 250)  # ran out of budget


def test_story_task_scores_hand_written_stories(tmp_path):
    """StoryTask.score on hand-made responses: the end token, the length band, quotes, the ending, the name, and
    gold the mean of the components present (character left out for a prompt without a name)."""
    from tasks.story import MIN_STORY_TOKENS, StoryTask
    from tasks.common import Example, gold_of
    from tokenizer import Tokenizer
    enc = Tokenizer(os.path.join(REPO, "stories260K", "tok512.model"))
    task = StoryTask.__new__(StoryTask)  # no data needed to score: set what score() reads
    task.enc = enc
    named = Example([enc.bos_id] + enc.encode("Once upon a time, there was a girl named Lily.", False, False),
                    "Once upon a time, there was a girl named Lily.", [], {"names": ["Lily"]})
    nameless = Example([enc.bos_id], "", [], {"names": []})
    good = " " + " ".join(['Lily found a ball in the park. "Can I play with you?" asked a dog.'] * 8) \
        + " Lily and the dog were happy."
    ids = enc.encode(good, False, False)
    assert len(ids) + len(named.prompt) - 1 >= MIN_STORY_TOKENS
    cut = enc.encode(" Lily ran. The end was near and", False, False)
    c_good, c_cut, c_plain = task.score([named, named, nameless], [ids + [enc.bos_id], cut, ids + [enc.bos_id]],
                                        nll=[1.0, 2.2, 1.6])
    assert c_good["complete"] == 1.0 and c_good["dialogue"] == 1.0 and c_good["happy_ending"] == 1.0
    assert c_good["character"] == 1.0 and c_good["fluent"] == 1.0
    assert c_good["not_repetitive"] == 0.0  # the same sentence eight times
    assert c_cut["complete"] == 0.0 and c_cut["dialogue"] == 0.0 and c_cut["fluent"] == 0.0
    assert "character" not in c_plain and set(c_plain) == {"complete", "dialogue", "happy_ending", "fluent",
                                                          "not_repetitive"}
    assert gold_of(c_plain) == pytest.approx(sum(c_plain.values()) / 5)
    assert task.story_text(named, ids).startswith("Once upon a time, there was a girl named Lily. Lily found")


def test_both_tasks_behind_one_interface():
    """load_task gives either task: held-out prompts from shard 0 only, fixed; training prompts redrawn per epoch;
    every prompt starts with BOS; score() gives per-component values in [0, 1] for each response."""
    from rlhf.common import load_task
    from tokenizer import Tokenizer
    data_dir = shared_path("tinystories", "TinyStories_all_data")
    enc = Tokenizer(os.path.join(REPO, "stories260K", "tok512.model"))
    for name in ("story", "instruct"):
        task = load_task(name, enc, data_dir)
        held, train = task.heldout_examples(40), task.train_examples(0)
        assert len(held) == 40 and len(train) > 1000
        assert [e.prompt for e in task.heldout_examples(40)] == [e.prompt for e in held]
        assert [e.prompt for e in task.train_examples(1)] != [e.prompt for e in train]
        assert all(e.prompt[0] == enc.bos_id for e in held + train[:50])
        held_text = {enc.decode(e.target) for e in task.heldout_examples()}
        assert not held_text & {enc.decode(e.target) for e in train}  # no held-out story is trained on
        responses = [e.target[:task.max_gen_len - 1] + [enc.bos_id] for e in held[:8]]
        if name == "story":
            scores = task.score(held[:8], responses, nll=[1.3] * 8)
            assert {e.text for e in held} != {""} and all(len(e.prompt) <= 30 for e in held)
        else:
            scores = task.score(held[:8], responses)
            assert all(v == 1.0 for c in scores for v in c.values())  # a story meets its own constraints
        assert all(set(c) <= set(task.components) and all(0.0 <= v <= 1.0 for v in c.values()) for c in scores)
    with pytest.raises(ValueError, match="unknown task"):
        load_task("poems", enc, data_dir)


def test_preference_pairs_order_by_gold_and_drop_ties():
    records = [{"group": 0, "gold": 0.5}, {"group": 0, "gold": 0.7}, {"group": 0, "gold": 0.5},
               {"group": 1, "gold": 0.1}, {"group": 1, "gold": 0.0}]
    assert sorted(preference_pairs(records)) == [(1, 0), (1, 2), (3, 4)]
    assert preference_pairs(records, min_margin=0.15) == [(1, 0), (1, 2)]


# -----------------------------------------------------------------------------
# verifiers

@pytest.mark.parametrize("a, b", [("jump", "jumped"), ("jump", "jumping"), ("jumps", "jump"), ("happy", "happier"),
                                  ("happy", "happily"), ("hop", "hopped"), ("hop", "hopping"), ("bake", "baked"),
                                  ("bake", "baking"), ("tree", "trees"), ("puppy", "puppies"), ("box", "boxes")])
def test_stem_matches_regular_inflections(a, b):
    assert stem(a) == stem(b)


@pytest.mark.parametrize("a, b", [("run", "ran"), ("cat", "car"), ("glass", "glad"), ("sun", "sunny")])
def test_stem_keeps_different_words_apart(a, b):
    assert stem(a) != stem(b)


def test_word_verifier_whole_words_inflections_case():
    assert score_words(STORY, ["jump", "puddle", "shine"]) == pytest.approx(2 / 3)  # shone is irregular
    assert score_words(STORY, ["happy", "shiny", "hop"]) == 1.0
    assert score_words(STORY, ["lily"]) == 1.0  # case-insensitive
    assert score_words(STORY, ["pud", "ho"]) == 0.0  # whole words only
    assert score_words(STORY, ["tree", "home", "dog"]) == pytest.approx(2 / 3)


def test_sentence_verifier_exact_normalised_and_partial():
    assert score_sentence(STORY, "she was happier than ever") == 1.0  # case and punctuation aside
    assert score_sentence(STORY, "The sun shone on the shiny trees and Lily hopped home.") == 1.0
    # "she was happier" gives 2 of the 5 bigrams of "she was happier than a dog"
    assert score_sentence(STORY, "She was happier than a dog.") == pytest.approx(3 / 5)
    assert score_sentence(STORY, "A frog sat on a log.") == 0.0


def test_dialogue_and_length_verifiers():
    assert has_dialogue(STORY) and has_dialogue("He said, \u201cHi there.\u201d")
    assert not has_dialogue('A story with no quotes at all. It has a "" pair.')
    assert constraint_scores("No talk here.", {"dialogue": False}, 3) == {"dialogue": 1.0}
    assert constraint_scores("No talk here.", {"dialogue": True}, 3) == {"dialogue": 0.0}
    assert score_length(250, "short") == 1.0 and score_length(300, "short") == 1.0
    assert score_length(325, "short") == pytest.approx(0.5)  # 25 tokens outside, slack 50
    assert score_length(351, "short") == 0.0 and score_length(330, "medium") == 1.0


def test_gold_is_the_mean_of_the_constraint_scores():
    c = {"words": ["jump", "dog"], "dialogue": True, "length": "long"}
    assert gold(STORY, c, 200) == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    with pytest.raises(ValueError, match="unknown constraint"):
        gold(STORY, {"colour": "red"}, 10)


def test_sentences_split_on_punctuation_and_quotes():
    assert sentences_of('A b c. "Hi!" she said. Done?') == ['A b c.', '"Hi!', 'she said.', 'Done?']


# -----------------------------------------------------------------------------
# relabelling

def test_relabelled_constraints_are_satisfied_by_their_own_story():
    stories = [STORY, 'Tom found a red kite. "Wow," Tom said to the dog. The kite flew over the tall hill. Tom smiled.',
               "Mia baked a cake. The cake was sweet and soft. Her friends ate the cake. They danced all day."] * 6
    ws = WordStats.from_stories(stories + [f"filler story {i} with words" for i in range(400)])
    rng = random.Random(0)
    kinds_seen = set()
    for s in stories:
        n = len(s) // 4
        c = relabel(s, n, ws, rng)
        if c is None:
            continue
        kinds_seen |= set(c)
        assert all(v == 1.0 for v in constraint_scores(s, c, n).values()), c
        text = prompt_text(c)
        assert text.endswith("Story:") and all(k in ("words", "sentence", "dialogue", "length") for k in c)
        for kind, field in (("words", "Words:"), ("sentence", "Random sentence:"), ("dialogue", "Features:")):
            assert (field in text) == (kind in c)
        if "words" in c:
            assert 1 <= len(c["words"]) <= 3 and "lily" not in c["words"] and "tom" not in c["words"]  # no names
            assert not set(c["words"]) & {"the", "was", "and"}
        if "sentence" in c:
            assert c["sentence"] != sentences_of(s)[0]  # never the first sentence
    assert kinds_seen == {"words", "sentence", "dialogue", "length"}


def test_instruct_data_on_the_excerpt_keeps_shard_0_apart():
    from tokenizer import Tokenizer
    data_dir = shared_path("tinystories", "TinyStories_all_data")
    enc = Tokenizer(os.path.join(REPO, "stories260K", "tok512.model"))
    data = InstructData(enc, data_dir)
    held = data.heldout_examples()
    train = data.train_examples(0)
    assert held and train
    assert not {e.info["story"] for e in held} & {e.info["story"] for e in train}
    assert [e.info for e in data.heldout_examples()] == [e.info for e in held]  # fixed by the seed
    assert [e.info for e in data.train_examples(1)] != [e.info for e in train]  # redrawn per epoch
    for e in held[:50] + train[:50]:
        assert len(e.prompt) + len(e.target) + 1 <= 512 and e.text == prompt_text(e.info["constraints"])
        assert all(v == 1.0 for v in constraint_scores(e.info["story"], e.info["constraints"], len(e.target)).values())


# -----------------------------------------------------------------------------
# statistics and losses by hand

def test_bootstrap_and_spearman():
    m, lo, hi = bootstrap_ci([0.0, 1.0] * 50)
    assert m == 0.5 and 0.38 < lo < 0.5 < hi < 0.62
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3], [1, 1, 2]) == pytest.approx(math.sqrt(3) / 2)  # average ranks for ties
    m, lo, hi = paired_diff_ci([1.0, 2.0, 3.0, 4.0], [0.0, 1.0, 2.0, 3.0])
    assert (m, lo, hi) == (1.0, 1.0, 1.0)  # every paired difference is 1
    with pytest.raises(ValueError, match="paired"):
        paired_diff_ci([1.0], [1.0, 2.0])
    assert pair_accuracy([(0, 1), (2, 1), (1, 2)], [3.0, 1.0, 1.0]) == pytest.approx((1 + 0.5 + 0.5) / 3)


def test_pairwise_reward_loss_by_hand():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    loss = pairwise_loss(chosen, rejected).mean()
    by_hand = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(1))) / 2
    assert loss.item() == pytest.approx(by_hand)


def test_dpo_loss_by_hand():
    losses, rc, rr = dpo_loss(torch.tensor([-10.0]), torch.tensor([-12.0]), torch.tensor([-11.0]),
                              torch.tensor([-11.0]), beta=0.5)
    assert rc.item() == pytest.approx(0.5) and rr.item() == pytest.approx(-0.5)
    assert losses.item() == pytest.approx(math.log(1 + math.exp(-1.0)))


def test_group_advantages_by_hand():
    r = [1.0, 0.0, 0.5, 0.5]  # two groups of two
    a = group_advantages(r, 2, "grpo")
    s = math.sqrt(0.5)  # unbiased std of (1, 0)
    assert a.tolist() == pytest.approx([0.5 / (s + 1e-4), -0.5 / (s + 1e-4), 0.0, 0.0])
    assert group_advantages(r, 2, "rloo").tolist() == pytest.approx([1.0, -1.0, 0.0, 0.0])
    assert group_advantages(r, 2, "reinforce").tolist() == pytest.approx([0.5, -0.5, 0.0, 0.0])
    g3 = group_advantages([3.0, 0.0, 0.0], 3, "rloo")
    assert g3.tolist() == pytest.approx([3.0, -1.5, -1.5])
    # the clipped loss: ratio 1 -> minus the mean advantage over all response tokens of the batch
    lp = torch.zeros(2, 3)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    loss = clipped_policy_loss(lp, lp, torch.tensor([1.0, -2.0]), mask, 0.2)[0]
    assert loss.item() == pytest.approx(-(1 + 1 - 2) / 3)
    # a ratio of 2 with a positive advantage is clipped to 1.2
    loss, clipfrac, _, _ = clipped_policy_loss(torch.full((1, 1), math.log(2.0)), torch.zeros(1, 1),
                                               torch.tensor([1.0]), torch.ones(1, 1), 0.2)
    assert loss.item() == pytest.approx(-1.2) and clipfrac.item() == 1.0
    # an empty mask (every response empty) gives 0, not NaN
    assert clipped_policy_loss(lp, lp, torch.tensor([1.0, 1.0]), torch.zeros(2, 3), 0.2)[0].item() == 0.0


def test_dr_grpo_advantage_and_the_loss_aggregations_by_hand():
    r = [1.0, 0.0, 0.5, 0.5]
    assert group_advantages(r, 2, "drgrpo").tolist() == pytest.approx([0.5, -0.5, 0.0, 0.0])  # no std
    with pytest.raises(ValueError, match="drgrpo"):
        group_advantages(r, 2, "grpoo")
    # ratio 1: the loss is minus the advantage on every response token; rows of 2 and 1 tokens, advantages 1, -2
    lp = torch.zeros(2, 3)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    adv = torch.tensor([1.0, -2.0])
    token = clipped_policy_loss(lp, lp, adv, mask, 0.2, "token")[0]
    sequence = clipped_policy_loss(lp, lp, adv, mask, 0.2, "sequence")[0]
    constant = clipped_policy_loss(lp, lp, adv, mask, 0.2, "constant", max_len=4)[0]
    assert token.item() == pytest.approx(-(1 + 1 - 2) / 3)  # every token weighs the same
    assert sequence.item() == pytest.approx(-(1 + -2) / 2)  # each response's mean, then the mean
    assert constant.item() == pytest.approx(-(1 + 1 - 2) / (2 * 4))  # the sum over a constant
    with pytest.raises(ValueError, match="aggregation"):
        aggregate(lp, mask, "mean")


def test_best_of_n_weights_equal_the_enumeration():
    rng = random.Random(0)
    keys = [rng.choice([0.1, 0.5, 0.9, 1.3]) for _ in range(7)]  # with ties
    vals = [rng.random() for _ in range(7)]
    for n in range(1, 8):
        w = best_of_n_weights(keys, n)
        assert sum(w) == pytest.approx(1.0)
        subsets = list(itertools.combinations(range(7), n))
        # the pick of a subset: the highest key, ties to the later position (as the sort by (key, index))
        exact = sum(vals[max(s, key=lambda i: (keys[i], i))] for s in subsets) / len(subsets)
        assert sum(wi * v for wi, v in zip(w, vals)) == pytest.approx(exact)
    assert best_of_n_weights(keys, 1) == pytest.approx([1 / 7] * 7)
    assert best_of_n_kl_bound(1) == 0.0 and best_of_n_kl_bound(4) == pytest.approx(math.log(4) - 0.75)
    with pytest.raises(ValueError):
        best_of_n_weights(keys, 8)


# -----------------------------------------------------------------------------
# batches, log-probs and the reward read at the last real token

def tiny_rm():
    torch.manual_seed(0)
    m = TransformerWithValueHead(ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64,
                                           max_seq_len=64))
    torch.nn.init.normal_(m.value_head.weight, std=0.5)
    return m.eval()


def test_reward_is_read_at_the_last_real_token_and_padding_does_not_change_it():
    rm = tiny_rm()
    prompts, responses = [[1, 5, 6], [1, 7], [1, 8, 9, 10]], [[11, 12], [13, 14, 15, 16, 17, 18], [19]]
    batched = reward_scores(rm, prompts, responses)
    alone = [reward_scores(rm, [p], [r])[0] for p, r in zip(prompts, responses)]
    assert batched == pytest.approx(alone, abs=1e-5)
    # and it is the value at the last token of the unpadded sequence
    seq = prompts[0] + responses[0]
    assert alone[0] == pytest.approx(rm(torch.tensor([seq])).values[0, -1].item(), abs=1e-6)
    tokens, last = pad_right([seq, seq + [3, 3]])
    assert last.tolist() == [4, 6] and tokens[0, 5:].tolist() == [0, 0]
    # story_first: BOS + response + the prompt's fields, read at the prompt's last token
    assert rm_sequence([1, 5, 6], [11, 12]) == [1, 5, 6, 11, 12]
    assert rm_sequence([1, 5, 6], [11, 12], "story_first") == [1, 11, 12, 5, 6]
    rm.layout = "story_first"
    batched = reward_scores(rm, prompts, responses)
    assert batched == pytest.approx([reward_scores(rm, [p], [r])[0] for p, r in zip(prompts, responses)], abs=1e-5)
    assert batched[0] == pytest.approx(rm(torch.tensor([[1, 11, 12, 5, 6]])).values[0, -1].item(), abs=1e-6)
    with pytest.raises(ValueError, match="layout"):
        rm_sequence([1], [2], "sideways")


def test_make_batch_masks_everything_but_the_response():
    inputs, targets, last = make_batch([[1, 5, 6], [1, 7]], [[8, 9], [10]])
    assert inputs.tolist() == [[1, 5, 6, 8], [1, 7, 0, 0]]
    assert targets.tolist() == [[-1, -1, 8, 9], [-1, 10, -1, -1]]
    rm = tiny_rm()
    lp, total = response_logprobs(rm, inputs, targets)
    logits = rm(inputs).logits.log_softmax(-1)
    assert total[0].item() == pytest.approx((logits[0, 2, 8] + logits[0, 3, 9]).item(), abs=1e-5)
    assert total[1].item() == pytest.approx(logits[1, 1, 10].item(), abs=1e-5)
    assert lp[1, 2:].abs().sum().item() == 0.0



def test_response_logprobs_in_groups_by_length_are_the_same_numbers():
    """GRPO's forwards in groups of rows of similar length (each at its own width): the same log-probabilities, bit
    for bit, row by row, as one forward of the whole batch."""
    g = random.Random(0)
    prompts = [[1] + [g.randrange(3, 32) for _ in range(g.randrange(1, 6))] for _ in range(9)]
    responses = [[g.randrange(3, 32) for _ in range(n)] for n in (40, 2, 55, 9, 30, 1, 58, 17, 33)]
    inputs, targets, _ = make_batch(prompts, responses)
    rm = tiny_rm()
    with torch.no_grad():
        lp, total = response_logprobs(rm, inputs, targets)
        for group in (1, 2, 4, 16):
            lp_g, total_g = response_logprobs(rm, inputs, targets, group)
            assert torch.equal(lp_g, lp) and torch.equal(total_g, total)


def test_scores_batched_in_order_of_length_come_back_in_the_callers_order():
    """reward_scores and sequence_logprobs batch their pairs by length: each answer still belongs to its own pair."""
    g = random.Random(1)
    prompts = [[1] + [g.randrange(3, 32) for _ in range(g.randrange(1, 6))] for _ in range(7)]
    responses = [[g.randrange(3, 32) for _ in range(n)] for n in (30, 2, 41, 9, 1, 25, 17)]
    rm = tiny_rm()
    alone = [reward_scores(rm, [p], [r])[0] for p, r in zip(prompts, responses)]
    assert reward_scores(rm, prompts, responses, batch_size=2) == pytest.approx(alone, abs=1e-5)
    alone = [sequence_logprobs(rm, [p], [r])[0] for p, r in zip(prompts, responses)]
    assert sequence_logprobs(rm, prompts, responses, batch_size=3) == pytest.approx(alone, abs=1e-4)


def test_reference_runs_its_model_once_for_gold_and_the_guard():
    """The story task's Reference keeps its last answer: gold's fluency and the guard's NLL of the same samples cost
    one pass, and other samples are computed afresh."""
    ref = Reference("unused.pt")
    ref._model, calls = tiny_rm(), []
    real_forward = ref._model.forward
    ref._model.forward = lambda *a, **k: calls.append(1) or real_forward(*a, **k)
    prompts, responses = [[1, 5], [1, 6, 7]], [[8, 9, 10], [11]]
    first = ref.nll(prompts, responses)
    assert ref.nll(prompts, responses) == first and len(calls) == 1
    first[0] = 99.0  # the caller's copy, not the kept answer
    assert ref.nll(prompts, responses)[0] != 99.0 and len(calls) == 1
    other = ref.nll(prompts, [[8, 9, 10], [12]])
    assert len(calls) == 2 and other[0] == pytest.approx(ref.nll(prompts, responses)[0], abs=1e-6) and len(calls) == 3


# -----------------------------------------------------------------------------
# every stage, tiny and seeded, on the TinyStories excerpt

def story_subset(folder, heldout=40, train=300):
    """The first stories of the excerpt's held-out shard and of its first training shard: every stage judges or
    samples from these, and the SFT stage scores all its training stories with the gold judge."""
    source = shared_path("tinystories", "TinyStories_all_data")
    folder.mkdir()
    for name, n in (("data00.json", heldout), ("data01.json", train)):
        with open(os.path.join(source, name)) as f:
            stories = json.load(f)[:n]
        with open(folder / name, "w") as f:
            json.dump(stories, f)
    return str(folder)


@pytest.fixture(scope="module")
def tiny_chain(tmp_path_factory):
    """Every training stage run once, tiny and seeded, on the first stories of the excerpt: {"out": the folder,
    "env", "common" flags, "args": {stage: its command line without --out_dir}, "outputs": {stage: its result}}."""
    tmp_path = tmp_path_factory.mktemp("chain")
    data_dir = story_subset(tmp_path / "stories")
    env = {"DATA_CACHE_DIR": str(tmp_path / "data")}
    common = [f"--data_dir={data_dir}", "--compile=False"]
    out = tmp_path / "rlhf"
    sft, rm = str(out / "sft" / "ckpt.pt"), str(out / "reward_model" / "rm.pt")
    args = {
        "sft": [*stage("sft"), f"--data_dir={data_dir}", "--max_iters=4", "--batch_size=4", "--eval_interval=2",
                "--top_fraction=0.05"],
        "reward_model": [*stage("reward_model"), *common, f"--policy={sft}", "--n_train_prompts=8",
                         "--n_heldout_prompts=4", "--samples_per_prompt=3", "--batch_size=2", "--epochs=1"],
        "dpo": [*stage("dpo"), f"--policy={sft}", f"--pairs={out / 'reward_model' / 'pool_train.jsonl'}",
                "--batch_size=2", "--epochs=1"],
        "grpo": [*stage("grpo"), *common, f"--policy={sft}", f"--reward={rm}", "--prompts_per_iter=2",
                 "--group_size=2", "--max_iters=3", "--mini_batch_size=2", "--save_interval=1"],
        "ppo_rlhf": [*stage("ppo_rlhf"), *common, f"--policy={sft}", f"--reward={rm}", "--rollouts=4",
                     "--mini_batch_size=2", "--max_iters=3"],
    }
    outputs = {"sft": "ckpt.pt", "reward_model": "rm.pt", "dpo": "ckpt.pt", "grpo": "ckpt.pt", "ppo_rlhf": "ckpt.pt"}
    stdout = {name: run([*a, f"--out_dir={out / name}"], env=env).stdout for name, a in args.items()}
    return {"out": out, "env": env, "common": common, "args": args, "outputs": outputs, "stdout": stdout,
            "sft": sft, "rm": rm}


@pytest.mark.slow
def test_every_stage_runs_tiny_and_seeded(tiny_chain):
    out, env, common, sft, rmp = (tiny_chain[k] for k in ("out", "env", "common", "sft", "rm"))
    kept, of = map(int, re.search(r"SFT on (\d+) of (\d+) training stories", tiny_chain["stdout"]["sft"]).groups())
    assert 200 <= of <= 300 and kept == round(0.05 * of)  # the stories that make a prompt and fit, 5% kept
    sft_data = json.load(open(out / "sft" / "sft_data.json"))
    assert sft_data["kept_gold"] > sft_data["all_gold"]
    rm = json.load(open(out / "reward_model" / "rm.json"))
    assert rm["train_pairs"] > 0 and 0.0 <= rm["accuracy"] <= 1.0 and set(rm["trivial"]) == {
        "longer_wins", "shorter_wins", "ended_wins", "length_only"}
    assert set(rm["per_component"]) <= {"complete", "dialogue", "happy_ending", "character", "fluent", "not_repetitive"}
    pool = [json.loads(x) for x in open(out / "reward_model" / "pool_train.jsonl")]
    assert len(pool) == 24 and all(r["gold"] == pytest.approx(sum(r["components"].values()) / len(r["components"]))
                                   for r in pool)
    assert (out / "grpo" / "ckpt_1.pt").exists() and (out / "grpo" / "ckpt.pt").exists()
    assert not any((out / name / "state.pt").exists() for name in tiny_chain["args"])  # removed once finished
    # seeded: each stage run again is the same run, bit for bit (its result and every logged number but the times),
    # checked by test_a_killed_stage_continues_where_it_stopped_bitwise against these runs
    assert len(logged(out / "grpo" / "metrics.jsonl")) == 3
    rows = [json.loads(x) for x in open(out / "ppo_rlhf" / "metrics.jsonl")]
    assert [r["iter"] for r in rows] == [1, 2, 3] and all(0.0 <= r["gold_mean"] <= 1.0 for r in rows)
    run([*stage("best_of_n"), *common, f"--policy={sft}", f"--reward={rmp}", f"--out_dir={out}",
         "--n_prompts=2", "--pool_size=4"], env=env)
    bon = json.load(open(out / "bon.json"))
    assert [r["n"] for r in bon["rows"]] == [1, 2, 4]
    for name, ckpt in (("sft", sft), ("dpo", out / "dpo" / "ckpt.pt"), ("grpo_first", out / "grpo" / "ckpt_1.pt"),
                       ("ppo_rm", out / "ppo_rlhf" / "ckpt.pt"), ("grpo_rm", out / "grpo")):  # the last: a run's folder
        run([*stage("evaluate"), *common, f"--policy={ckpt}", f"--name={name}", f"--sft={sft}",
             f"--reward_model={rmp}", f"--out_dir={out}", "--n_prompts=3"], env=env)
    e = json.load(open(out / "eval_sft.json"))
    assert e["n"] == 3 and abs(e["kl_sft"]) < 1e-3  # the SFT model against itself
    # a run's folder: each ckpt_<iter>.pt as <name>@<iter>, the same numbers as evaluated alone, then ckpt.pt
    along = {i: json.load(open(out / f"eval_grpo_rm@{i}.json")) for i in (1, 2)}
    alone = json.load(open(out / "eval_grpo_first.json"))
    assert along[1]["golds"] == alone["golds"] and along[1]["kl_sft"] == pytest.approx(alone["kl_sft"], abs=1e-4)
    last = json.load(open(out / "eval_grpo_rm.json"))
    assert last["policy"].endswith("ckpt.pt") and last["kl_sft"] != along[1]["kl_sft"]  # each checkpoint's own weights
    lines = [json.loads(x) for x in open(out / "samples_dpo.jsonl")]
    assert len(lines) == 3 and {"prompt", "story", "gold", "components"} <= set(lines[0])
    proc = run([*stage("evaluate"), f"--report={out}"], env=env)
    assert "| dpo |" in proc.stdout and (out / "report.md").exists() and (out / "report.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sft", "reward_model", "dpo", "grpo", "ppo_rlhf"])
def test_a_killed_stage_continues_where_it_stopped_bitwise(tiny_chain, tmp_path, name):
    """kill -9 halfway through the stage's second save of where it is (state.pt, every iteration with
    --resume_every=0), then (SFT, GRPO, PPO) at a random moment after it continued; each time the same command
    again. The stage continues from the last complete save (redoing only the iteration whose save was cut) and ends
    bitwise as the uninterrupted run: its result, its metrics; and the run state is gone once it is done."""
    args = [*tiny_chain["args"][name], f"--out_dir={tmp_path / name}", "--resume_every=0"]
    first = 1 if name in ("grpo", "ppo_rlhf") else 0  # the stage's first iteration
    code, out = killed_run(args, tiny_chain["env"], die_at_save=2)
    assert code == 137, out[-2000:]
    assert (tmp_path / name / "state.pt").exists()
    if name == "grpo":  # the command again with another setting: refused in one line, the saved state kept
        proc = run([*args, "--learning_rate=0.01"], env=tiny_chain["env"], check=False)
        assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].startswith(
            f"error: {tmp_path / name / 'state.pt'} is an unfinished run with other settings (learning_rate="), \
            proc.stderr[-1000:]
    code, out = -9, ""
    if name in ("sft", "grpo", "ppo_rlhf"):  # (DPO and the reward model skip done steps as SFT does: time saved)
        code, out = killed_run(args, tiny_chain["env"], kill_at="continuing the unfinished run",
                               delay=random.Random(name).uniform(0.0, 1.0))  # a random moment of the rest
        assert code in (0, -9), out[-2000:]
    if code != 0:  # killed (not finished first): the same command again
        out += run(args, env=tiny_chain["env"]).stdout
    # the first continuation starts after the one complete save: only the iteration whose save was cut is redone
    assert re.search(r"continuing the unfinished run in \S+ from iteration (\d+)", out).group(1) == str(first + 1)
    result = tiny_chain["outputs"][name]
    a, b = (torch.load(folder / result, weights_only=True) for folder in (tiny_chain["out"] / name, tmp_path / name))
    for ck in (a, b):  # the settings that differ by design
        del ck["config"]["out_dir"], ck["config"]["resume_every"]
    assert first_difference(a, b) is None, first_difference(a, b)
    assert logged(tiny_chain["out"] / name / "metrics.jsonl") == logged(tmp_path / name / "metrics.jsonl")
    assert not (tmp_path / name / "state.pt").exists()


@pytest.mark.parametrize("args, message", [
    ([*stage("sft"), "--task=instruct", "--kinds=words,colour"], "--kinds must be"),
    ([*stage("sft"), "--task=poems"], "unknown task 'poems'"),
    ([*stage("sft"), "--top_fraction=0"], "--top_fraction must be"),
    ([*stage("grpo"), "--advantage=ppo"], "--advantage must be"),
    ([*stage("grpo"), "--group_size=1"], "--group_size must be"),
    ([*stage("grpo"), "--reward=nope.pt"], "--reward must be gold or the path of a reward model"),
    ([*stage("grpo"), "--policy=missing/ckpt.pt"], "missing/ckpt.pt not found"),
    ([*stage("grpo"), "--policy=stories260K/stories260K.pt", "--reward=stories260K/stories260K.pt"],
     "is not a reward model"),
    ([*stage("ppo_rlhf"), "--reward=nope.pt"], "--reward must be gold or the path of a reward model"),
    ([*stage("ppo_rlhf"), "--kl_penalty=k9"], "kl_penalty must be one of"),
    ([*stage("dpo"), "--beta=0"], "--beta must be > 0"),
    ([*stage("dpo"), "--task=poems"], "unknown task 'poems'"),
    ([*stage("reward_model"), "--samples_per_prompt=1"], "--samples_per_prompt must be"),
    ([*stage("evaluate"), "--policy=stories260K/stories260K.pt", "--tokenizer=../shared/llama2/tokenizer.model"],
     "has 32000 tokens but the model has vocab_size=512"),
    ([*stage("evaluate"), "--report=/nonexistent/folder"], "no eval_"),
])
def test_bad_settings_are_refused_in_one_line(args, message):
    if any("../shared" in a for a in args):
        shared_path("llama2", "tokenizer.model")
    proc = run_in_process(args)
    assert proc.returncode != 0
    lines = [x for x in proc.stderr.strip().splitlines() if not x.startswith("Overriding:")]
    assert message in proc.stderr and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr


def test_a_malformed_jsonl_line_is_named_by_file_and_line(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": [1, 2], "gold": 0.5}\n\n{"prompt": [1, 2], "story": "a\tb"}\n')  # a raw tab
    proc = run_in_process([*stage("dpo"), f"--pairs={pairs}"])
    lines = [x for x in proc.stderr.strip().splitlines() if not x.startswith("Overriding:")]
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr
    assert lines[0] == f"error: {pairs}, line 3, column 31: not valid JSON (Invalid control character)", lines[0]


def test_shuffled_batches_cover_each_epoch_once_in_full_batches():
    from rlhf.common import shuffled_batches
    out = list(shuffled_batches(list(range(10)), 3, 2, seed=0))
    assert [s for s, _ in out] == list(range(6)) and all(len(b) == 3 for _, b in out)
    for epoch in (out[:3], out[3:]):
        seen = [x for _, b in epoch for x in b]
        assert len(set(seen)) == 9  # one item per epoch left over, none repeated
    assert out == list(shuffled_batches(list(range(10)), 3, 2, seed=0))  # seeded


def test_report_finds_the_peak_and_checks_the_targets():
    """report.peaks: the checkpoint of highest gold along a run (from SFT), with its neighbours, and whether the
    proxy still rises after it; report.targets: met or not from the numbers."""
    from report import peaks, report_order, targets

    def ev(name, gold, kl, rm, golds=None):
        return {"name": name, "gold": gold, "kl_sft": kl, "rm_score": rm, "golds": golds or [gold] * 4}
    evals = {"sft": ev("sft", 0.60, 0.0, 1.0), "run@5": ev("run@5", 0.70, 5.0, 2.0),
             "run@10": ev("run@10", 0.65, 20.0, 2.5), "run": ev("run", 0.62, 40.0, 3.0),
             "flat@5": ev("flat@5", 0.70, 5.0, 2.0), "flat": ev("flat", 0.75, 8.0, 2.2)}
    pk = peaks(evals)
    assert pk["run"]["peak"]["name"] == "run@5" and pk["run"]["before"]["name"] == "sft"
    assert pk["run"]["after"]["name"] == "run@10" and pk["run"]["proxy_rises_after_peak"]
    assert pk["flat"]["peak"]["name"] == "flat" and pk["flat"]["after"] is None
    assert sorted(["run", "run@10", "sft", "run@5", "pretrained"], key=report_order) == \
        ["pretrained", "sft", "run@5", "run@10", "run"]
    evals["dpo"] = ev("dpo", 0.75, 16.0, 2.0, golds=[0.75] * 4)  # +0.15 but past the KL budget
    evals["grpo_rm"] = ev("grpo_rm", 0.72, 5.0, 2.0, golds=[0.72] * 4)
    got = {t["target"].split(":")[0]: t["met"] for t in targets(evals, {})}
    assert got == {"dpo": False, "grpo_rm": True}
