"""UperNet on a VMoE backbone that keeps the MoE aux loss.

transformers' `UperNetForSemanticSegmentation` builds any registered backbone, so
`UperNetConfig(backbone_config=VMoEConfig(...))` already runs on `VMoEBackbone`; but its loss is only the pixel
cross-entropy, and the routing aux loss the backbone returns is dropped, so the routers get no balancing signal.
:class:`VMoEUperNetForSemanticSegmentation` is a thin subclass (same weights, same config, same checkpoint layout)
whose `loss` adds the backbone's `aux_loss`; a checkpoint saved from it also loads into the stock class.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import UperNetConfig, UperNetForSemanticSegmentation
from transformers.modeling_outputs import SemanticSegmenterOutput

from ..configuration_vmoe import VMoEConfig
from ..modeling_vmoe import ROUTING_FIELDS, VMoEBackbone




@dataclass
class VMoEUperNetOutput(SemanticSegmenterOutput):
    """`SemanticSegmenterOutput` plus the backbone's routing fields (`aux_loss` is already included in `loss`)."""

    router_logits: tuple[torch.FloatTensor, ...] | None = None
    aux_loss: torch.FloatTensor | None = None
    superclass_loss: torch.FloatTensor | None = None
    superclass_accuracy: torch.FloatTensor | None = None
    expert_counts: torch.LongTensor | None = None


class VMoEUperNetForSemanticSegmentation(UperNetForSemanticSegmentation):
    """`UperNetForSemanticSegmentation` whose loss also includes the MoE backbone's routing aux loss.

    Use with `UperNetConfig(backbone_config=VMoEConfig(..., out_indices=[...]))` (see :func:`vmoe_upernet_config`).
    `loss` = decode-head cross-entropy + `auxiliary_loss_weight` * auxiliary-head cross-entropy (both ignoring
    `config.loss_ignore_index`) + backbone `aux_loss`. With a non-MoE backbone it behaves exactly like the stock class.
    """

    accepts_loss_kwargs = False

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        labels: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ):
        if labels is not None and self.config.num_labels == 1:
            raise ValueError(
                f"The number of labels should be greater than one, got num_labels={self.config.num_labels}"
            )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        backbone_kwargs = dict(output_hidden_states=output_hidden_states, output_attentions=output_attentions)
        if isinstance(self.backbone, VMoEBackbone):  # the aux loss whenever there is a loss; router logits if asked
            output_router_logits = kwargs.get("output_router_logits")
            if output_router_logits is None:  # output capture reads an explicit None as "no", not as the config's
                output_router_logits = self.backbone.config.output_router_logits
            backbone_kwargs.update(compute_routing_loss=True if labels is not None else None,
                                   output_router_logits=output_router_logits)
        outputs = self.backbone.forward_with_filtered_kwargs(pixel_values, **backbone_kwargs)
        features = outputs.feature_maps
        size = pixel_values.shape[2:]
        logits = nn.functional.interpolate(self.decode_head(features), size=size, mode="bilinear", align_corners=False)
        auxiliary_logits = None
        if self.auxiliary_head is not None:
            auxiliary_logits = nn.functional.interpolate(
                self.auxiliary_head(features), size=size, mode="bilinear", align_corners=False
            )
        aux_loss = getattr(outputs, "aux_loss", None)
        loss = None
        if labels is not None:
            loss_fct = nn.CrossEntropyLoss(ignore_index=self.config.loss_ignore_index)
            loss = loss_fct(logits, labels)
            if auxiliary_logits is not None:
                loss = loss + self.config.auxiliary_loss_weight * loss_fct(auxiliary_logits, labels)
            if aux_loss is not None:
                loss = loss + aux_loss.to(loss.dtype)
        output = VMoEUperNetOutput(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **{name: getattr(outputs, name, None) for name in ROUTING_FIELDS},
        )
        return output if return_dict else output.to_tuple()


def vmoe_upernet_config(
    backbone_config: VMoEConfig,
    out_indices: list[int] | tuple[int, ...] | None = None,
    hidden_size: int = 512,
    **kwargs,
) -> UperNetConfig:
    """UperNet config on a VMoE backbone. `out_indices` (default: four evenly spaced blocks ending with the last,
    e.g. 3, 6, 9, 12 of 12) are the blocks whose outputs feed the decode head; `kwargs` go to `UperNetConfig`
    (`num_labels`/`id2label`, `use_auxiliary_head`, `auxiliary_in_channels`, `pool_scales`, ...)."""
    config = VMoEConfig(**backbone_config.to_dict())
    n = config.num_hidden_layers
    if out_indices is None:
        step = max(1, n // 4)
        out_indices = sorted({min(n, step * i) for i in range(1, 5)} | {n})[-4:]
    config.set_output_features_output_indices(out_indices=list(out_indices), out_features=None)
    kwargs.setdefault("auxiliary_in_channels", config.hidden_size)
    return UperNetConfig(backbone_config=config, hidden_size=hidden_size, **kwargs)


__all__ = ["VMoEUperNetForSemanticSegmentation", "VMoEUperNetOutput", "vmoe_upernet_config"]
