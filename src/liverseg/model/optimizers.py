"""Keras' ``Adam`` on TensorFlow's fused kernel (``ResourceApplyAdam``).

On the default U-Net (64 variables) Keras 3's chain of about a dozen element-wise ops per
variable and step cost 8 % of a training step on one CPU thread, and 2.5 to 3.6 CPU s of
tracing per compiled model while the first step was traced twice (before ``compile_unet``
built the optimizer up front; ``benchmarks/bench_processes.py``, benchmarks/README.md).
"""

from __future__ import annotations

from typing import Any

import keras


@keras.saving.register_keras_serializable(package="liverseg")
class FusedAdam(keras.optimizers.Adam):
    """``keras.optimizers.Adam`` (same variables, arguments, saved config and rule: ``alpha = lr
    * sqrt(1 - beta_2^t) / (1 - beta_1^t)``, ``var -= alpha * m / (sqrt(v) + epsilon)``) with
    one fused kernel per variable; the results agree with Keras' to float32 rounding (the
    multiplications run in another order). Any other case (AMSGrad, a ``tf.distribute``
    strategy, variables or gradients other than dense float32, a backend other than
    TensorFlow) runs Keras' own code.
    """

    def _fusable(self, grads: list[Any], variables: list[Any]) -> bool:
        if keras.backend.backend() != "tensorflow" or self.amsgrad:
            return False
        import tensorflow as tf

        if tf.distribute.has_strategy():
            return False
        return all(
            isinstance(g, tf.Tensor) and g.dtype == tf.float32 and v.dtype == "float32"
            for g, v in zip(grads, variables, strict=True)
        )

    def _backend_update_step(
        self, grads: list[Any], trainable_variables: list[Any], learning_rate: Any
    ) -> None:
        if not self._fusable(grads, trainable_variables):
            super()._backend_update_step(grads, trainable_variables, learning_rate)
            return
        import tensorflow as tf

        # Computed once per step for all variables (Keras' update_step does it per variable).
        step = tf.cast(self.iterations + 1, tf.float32)
        beta_1 = tf.constant(self.beta_1, tf.float32)
        beta_2 = tf.constant(self.beta_2, tf.float32)
        beta_1_power = tf.pow(beta_1, step)
        beta_2_power = tf.pow(beta_2, step)
        lr = tf.cast(learning_rate, tf.float32)
        epsilon = tf.constant(self.epsilon, tf.float32)
        for grad, variable in zip(grads, trainable_variables, strict=True):
            index = self._get_variable_index(variable)
            tf.raw_ops.ResourceApplyAdam(
                var=_handle(variable),
                m=_handle(self._momentums[index]),
                v=_handle(self._velocities[index]),
                beta1_power=beta_1_power,
                beta2_power=beta_2_power,
                lr=lr,
                beta1=beta_1,
                beta2=beta_2,
                epsilon=epsilon,
                grad=grad,
            )


def _handle(variable: Any) -> Any:
    """The resource handle of a Keras variable (or of a tf.Variable)."""
    return getattr(variable, "value", variable).handle
