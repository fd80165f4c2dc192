"""A value head width other than the query/key one (multi-head latent attention: DeepSeek-V3's 192-wide
q/k and 128-wide v). Every strategy against the float64 oracle, outputs and gradients, with the bytes each
rank sends equal to the hand-written model (K and V travel in one buffer of width d + dv) and the product's."""

from ._cases import check, grid, launch


def test_every_strategy_with_v_narrower_or_wider_than_q_and_k():
    world = 4
    cases = [dict(c, dv=dv) for dv in (4, 12) for c in grid(["ring", "zigzag", "striped", "allgather", "ulysses"],
                                                              world, causals=(True,))]
    cases += [dict(strategy="hybrid", mesh=(2, 2), layout="zigzag", b=2, n=32, h=4, hkv=hkv, d=8, dv=4, causal=True)
              for hkv in (4, 1)]
    cases += [dict(cases[0], window=5, dv=12), dict(cases[1], kernel="reference", dv=4)]
    check(cases, launch(cases, world), world)
