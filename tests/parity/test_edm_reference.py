"""The four preconditionings of EDM's Table 1 and their sampling steps against values pinned from the authors' code,
NVlabs/edm at commit 008a4e5: ``training/networks.py`` (VPPrecond, VEPrecond, iDDPMPrecond, EDMPrecond) as it is,
with ``torch_utils.persistence`` stubbed (pickling only) and the inner network replaced by
F(x, c_noise) = tanh(x) + 0.001 c_noise (iDDPM's doubled output channels repeat it), called with ``force_fp32``;
and ``generate.py``'s ``ablation_sampler`` (num_steps=6, solver euler, schedule linear, scaling none), recording the σ
it passes to the network. EDM computes in float32 (its iDDPM levels u_j too, over 1000 recursive steps: ~5e-4
relative at u_999, where ours are float64), hence the tolerances."""

from __future__ import annotations

import torch

from difflab.schedules import SigmaProcess
from tests.parity.analytic import pattern

SIGMA = torch.tensor([0.01, 0.5, 3.0, 60.0])
# D(x; σ) of each preconditioner on x = pattern((4, 1, 2, 2), seed=11, scale=3), σ above (one σ per image)
D = {
    "vp": [
        -2.683664083480835,
        -1.442151427268982,
        4.160399913787842,
        -2.783360719680786,
        -0.9850262999534607,
        3.572673797607422,
        -2.468322515487671,
        -0.8793133497238159,
        0.10170125961303711,
        -2.200467824935913,
        -1.5197484493255615,
        0.0761866569519043,
        -54.08031463623047,
        -54.07740783691406,
        -54.07052993774414,
        -54.08056640625,
    ],  # noqa: E501
    "ve": [
        -2.7035255432128906,
        -1.460113286972046,
        4.180346488952637,
        -2.803255081176758,
        -1.7626025676727295,
        4.643461227416992,
        -3.387953758239746,
        -1.6207466125488281,
        7.114089012145996,
        -5.968141078948975,
        -3.4517757892608643,
        7.080137252807617,
        -62.61717224121094,
        -45.13100051879883,
        64.2100601196289,
        -62.747032165527344,
    ],  # noqa: E501
    "iddpm": [
        -2.6836647987365723,
        -1.4421522617340088,
        4.160399436950684,
        -2.7833614349365234,
        -1.0571917295455933,
        3.5005083084106445,
        -2.5404880046844482,
        -0.9514787793159485,
        -0.8505535125732422,
        -3.1527228355407715,
        -2.472003221511841,
        -0.876068115234375,
        -59.28312301635742,
        -59.28021240234375,
        -59.27333450317383,
        -59.28337097167969,
    ],  # noqa: E501
    "edm": [
        -2.70249605178833,
        -1.46047043800354,
        4.1787238121032715,
        -2.8021693229675293,
        -1.0012363195419312,
        2.425689220428467,
        -1.7985844612121582,
        -0.9322232604026794,
        0.5427464842796326,
        -0.45222824811935425,
        -0.19664868712425232,
        0.5405305027961731,
        -0.025312095880508423,
        -0.0074690780602395535,
        0.03443027660250664,
        -0.026054218411445618,
    ],  # noqa: E501
}
# the σ range of VEPrecond and iDDPMPrecond, and iDDPM's u_0, u_8, u_500, u_999, u_1000
RANGE = {"ve": (0.02, 100.0), "iddpm": (0.006422337144613266, 20291.169921875)}
U = [20291.169921875, 80.20369720458984, 1.0123889446258545, 0.006422337144613266, 0.0]
# ablation_sampler's σ steps (the defaults of each discretization), N = 6
STEPS = {
    "vp": [
        152.16697028394634,
        25.148852404503927,
        6.111662506047293,
        2.0344293401724713,
        0.7238067666813107,
        0.010485992786706403,
    ],  # noqa: E501
    "ve": [100.0, 18.2056420302608, 3.314454017339986, 0.6034176336545164, 0.10985605433061173, 0.02],
    "iddpm": [
        80.20369720458984,
        3.007101535797119,
        1.3726155757904053,
        0.7306733131408691,
        0.3339899182319641,
        0.006422337144613266,
    ],  # noqa: E501
    "edm": [80.0, 24.408341786580095, 5.838947631011886, 0.9654169263318955, 0.08508720268939021, 0.002000000000000003],
}


def inner(x_in: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
    return torch.tanh(x_in) + 0.001 * c_noise.reshape(-1, 1, 1, 1)


def test_preconditioned_denoisers_match_edm():
    x = pattern((4, 1, 2, 2), seed=11, scale=3.0)
    for name, reference in D.items():
        ours = SigmaProcess(name).precondition(inner, x, SIGMA)
        torch.testing.assert_close(ours.flatten(), torch.tensor(reference), rtol=2e-5, atol=2e-5, msg=name)


def test_iddpm_levels_and_ranges_match_edm():
    process = SigmaProcess("iddpm")
    ours = process.u_64[[0, 8, 500, 999, 1000]]
    torch.testing.assert_close(ours, torch.tensor(U, dtype=torch.float64), rtol=1e-3, atol=0)  # EDM's float32 u
    for name, (lo, hi) in RANGE.items():
        process = SigmaProcess(name)
        assert abs(process.sigma_min / lo - 1) < 1e-3 and abs(process.sigma_max / hi - 1) < 1e-6, name


def test_sampling_steps_match_edms_discretizations():
    """sigma_schedule=model on a σ process takes its preconditioning's own steps (Table 1's "time steps" row)."""
    for name, reference in STEPS.items():
        ours = SigmaProcess(name).sampling_sigmas(6)
        rtol = 1e-3 if name == "iddpm" else 1e-6  # EDM's float32 u_j
        torch.testing.assert_close(ours, torch.tensor(reference, dtype=torch.float64), rtol=rtol, atol=0, msg=name)
