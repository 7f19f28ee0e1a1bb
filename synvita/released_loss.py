"""The released code's answer loss (03_train.py --answer_loss vocab), in place of Eqs. (1)-(2)'s
two-way terms: one sum of full-vocabulary cross-entropies over every answer token of a micro-batch
(common.answer_token_loss), phi on synthetic pairs, divided by the micro-batch's N answer tokens;
Eq. (6) averaged over half-triplets, as released. The default is 03_train.py's objective (Eq. 7)."""
import torch

import common
from synvita import pairs, triplets


# NOTE (deviation): the default --answer_loss two_way (Eqs. 1-2 as written) weighs Eq. (7)'s terms
# unlike the released loss below, which divides ONE sum of full-vocabulary answer-token cross-
# entropies by the micro-batch's N answer tokens. A triplet with a twin brings 4 pairs of 2 tokens
# (the word, the end token): N = 8 a triplet. Where the word's probability mass sits on Yes/No (its
# full-vocabulary CE = the two-way CE) and the end token is learnt (CE ~ 0), the release's loss is,
# in our terms, L_real/8 + L_syn^phi/8 + lambda_scr L_scr^phi/2 (its L_scr averages half-triplets of
# two hinges, ours triplets of four) = (L_real + L_syn^phi + 4 lambda_scr L_scr^phi) / 8. So
# --lambda_scr 4 gives the release's balance between the terms, at 1/8 of its scale (which gradient
# clipping sees), and only without explanations (their tokens join N). --answer_loss vocab reproduces
# the release exactly; the default keeps the paper's lambda_scr = 1.
# NOTE (deviation): with k twins (Table 5's "ALL", no released config) the released loss is extended
# as its own means count: per token and per half-triplet. Each twin's 2 pairs bring their 4 tokens,
# weighted by that twin's phi, into the one sum and into N; L_scr^phi averages the half-triplets with
# a twin, counted per twin (twin j: its V^s half and the V^r half with weight phi_j). So, unlike the
# two-way mean over twins, a triplet with k twins weighs about k-fold in L_syn^phi and L_scr^phi here,
# as in the release run on the k CSVs concatenated, but with L_real's tokens counted once.
def released_objective(scored, batch, args):
    """The released code's loss (--answer_loss vocab), in place of Eqs. (1)-(2)'s two-way terms:
        L = 1/N sum_k w_k CE_k  +  lambda_scr * L_scr^phi * b / (2 * twins)
    over every answer token k of the micro-batch (the word and the end token of each entailment pair,
    every token of an explanation, and its end token): CE_k its full-vocabulary cross-entropy
    (common.answer_token_loss), w_k = phi on synthetic pairs (its twin's) and 1 elsewhere, N the
    number of tokens. l_real, l_syn and l_nle are that sum's parts over the real pairs, the synthetic
    pairs and the explanations. L_scr^phi then averages the half-triplets that have a twin, as
    released (half of Eq. 6's per-triplet sum): b triplets with `twins` twins in all. Returns
    {03_train.py's TERMS: 0-dim tensors}."""
    zero = torch.zeros((), device=scored[0][2].device)  # a term with nothing to sum
    tokens = answer_tokens(scored, batch)  # pair name -> [(w_k, (logits (K, vocab), targets (K,))), ...]
    n_tokens = sum(len(y) for group in tokens.values() for _, (_, y) in group)  # N, over all pairs
    l_real = token_loss(tokens["rr"] + tokens["rs"], n_tokens, zero)
    l_syn = token_loss(tokens["ss"] + tokens["sr"], n_tokens, zero)  # every twin's pairs
    l_nle = token_loss(tokens["nle"], n_tokens, zero)  # VideoCon's explanation task, in the same sum
    a, w, k = pairs.triplet_logits(scored, batch, zero)
    l_scr = zero
    if args.use_syn and args.use_scr and sum(k):  # the release's mean is over its half-triplets with a twin
        hinges = pairs.over_twins([common.loss_scr(*pairs.scr_logits(t), t.w, args.gamma)
                                   for t in pairs.twin_views(a, w)], zero)  # each twin j with its phi_j
        l_scr = hinges * len(k) / (2 * sum(k))  # len(k) = b; sum(k): twins, each counted
    loss = common.total_loss(l_real, l_syn, l_scr, args.lambda_scr) + l_nle
    return dict(loss=loss, l_real=l_real, l_syn=l_syn, l_scr=l_scr, l_nle=l_nle)  # TERMS, in their order


def answer_tokens(scored, batch):
    """The answer tokens of the pairs that carry them, by pair (every twin's under "ss" and "sr"), in
    pair order (pairs.pair_specs': item by item, twin by twin): [(w_k, (logits (K, vocab), targets
    (K,))), ...], w_k = the twin's phi for the synthetic pairs, 1 otherwise. A pair is found by the
    name pairs.pair_name makes of (pair, twin j), as triplet_logits finds it."""
    # t' pairs carry no tokens: the released code has no token loss for them, only Eq. (6)
    carried = {(i, name): t for i, name, _, t in scored if t}  # (item position, pair name) -> its tokens
    groups = {name: [] for name in ("rr", "rs", "ss", "sr", "nle")}
    for i, r in enumerate(batch):
        phi = [w for _, w in triplets.twins(r)]  # twin j's weight (none for an explanation)
        for pair, group in groups.items():
            for j, w_k in enumerate(phi if pair in ("ss", "sr") else [1.0]):  # a synthetic pair: one per twin
                key = (i, pairs.pair_name(pair, j))  # item i's pair, of twin j
                if key in carried:
                    group.append((w_k, carried[key]))
    return groups


def token_loss(group, n_tokens, zero):
    """common.answer_token_loss over a group's tokens, each weighted by its pair's w_k, / N = n_tokens."""
    if not group:
        return zero
    logits, targets = torch.cat([x for _, (x, _) in group]), torch.cat([y for _, (_, y) in group])  # (K, vocab), (K,)
    weights = torch.cat([torch.full((len(y),), w_k, device=zero.device) for w_k, (_, y) in group])  # (K,)
    return common.answer_token_loss(logits, targets, weights, n_tokens)
