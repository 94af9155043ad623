"""The attack suite: each threat of docs/threats.md built for real against a small model, and shown
caught by aftune's audit (`aftune attack NAME`, `aftune eval-detection`; docs/attacks.md).

Training side (an `aftune.train.Deviation` inside aftune's own recorded trainer):
    bitflip          WBP: exponent-bit flips of searched weights while fine-tuning (bitflip.py)
    quant-objective  Qu-ANTI-zation A: an adversarial quantization objective (quant_objective.py)
    skip-steps, fewer-steps, smaller-batch, other-lr, substitute-layer-block, poison-examples
                     lazy and dishonest training (lazy.py)
Serving side (an `aftune.inference.ServingDeviation` inside the recorded inference engine):
    quant-serving    Qu-ANTI-zation B: a quantized copy served as the float model (quant_serving.py)
    activation       AFTUNE: smallest PGD perturbation of a block input that changes the answer (activation.py)
    parameter        AFTUNE: smallest bounded weight edit planting a backdoor / poisoning an input (parameter.py)

Shared: the tiny ViT task (task.py), fake quantization (quantize.py), the bench that runs each
attack next to the honest run (bench.py, serving.py), detection measurement (detection.py) and
the eval-detection table and plot (evaluate.py).
"""
