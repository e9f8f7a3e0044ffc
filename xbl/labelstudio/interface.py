"""The labeling interfaces annotators and reviewers work in, and the names of their parts that
payloads.py, results.py and oracle.py share. Annotations come back as feedback masks: W (1 = the
model must not use this pixel) and the keep mask (1 = the annotator affirmed this pixel as
evidence). No network here; services/labelstudio.py talks to the server.

Coordinates: Label Studio stores rectangles in percent of the image, so the shown image may be
an upscaled copy of the model's input; `height`, `width` and `cell` are in model-input pixels.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence

IGNORE_LABEL = "ignore"


ATTENTION_LABEL = "model attention"


RATING_NAME = "explanation_rating"


RATINGS = ("good", "bad")


RECTANGLES_NAME = "cells"


BRUSH_NAME = "brush"


IMAGE_NAME = "image"


# a cluster task: does the answer on the representative hold for the cluster's members?
APPLIES_NAME = "applies_to"


APPLIES = {"all members": "all", "none": "none", "members after review": "review"}


# a review task: one click on a mask carried to a member
REVIEW_NAME = "review"


REVIEW_CHOICES = ("accept", "reject")


def labeling_config(
    labels: Sequence[str] = (IGNORE_LABEL, ATTENTION_LABEL), cluster: bool = False
) -> str:
    """The annotator's interface: image and explanation side by side, the model's top cells
    pre-drawn as `labels[1]` rectangles on the image; relabel (or paint) what to ignore as
    `labels[0]`; cells left as `labels[1]`, and regions drawn or painted as `labels[1]`, are
    the evidence the model should look at. `cluster`: the image is a cluster's representative;
    a montage of members follows, and the answer says whom it applies to (Label Studio wants
    every key of the config in every task, so cluster rounds use this variant)."""
    ignore, attention = labels
    return f"""<View>
  <Header value="Which outlined cells should the model ignore?"/>
  <Text name="summary" value="$summary"/>
  <View style="display: flex; gap: 1em; align-items: flex-start;">
    <View style="flex: 1;">
      <Header value="Image: relabel the cells the model must ignore; leave (or paint) '{attention}' on the evidence" size="6"/>
      <Image name="{IMAGE_NAME}" value="$image" zoom="true" zoomControl="true"/>
    </View>
    <View style="flex: 1;">
      <Header value="Model explanation (saliency, top cells outlined)" size="6"/>
      <Image name="overlay" value="$overlay"/>
    </View>
  </View>
  <RectangleLabels name="{RECTANGLES_NAME}" toName="{IMAGE_NAME}">
    <Label value="{ignore}" background="#d62728"/>
    <Label value="{attention}" background="#ffbf00"/>
  </RectangleLabels>
  <BrushLabels name="{BRUSH_NAME}" toName="{IMAGE_NAME}">
    <Label value="{ignore}" background="#d62728"/>
    <Label value="{attention}" background="#ffbf00"/>
  </BrushLabels>
  <Header value="Is the model right for the right reasons?" size="6"/>
  <Choices name="{RATING_NAME}" toName="{IMAGE_NAME}" choice="single" showInline="true">
    <Choice value="{RATINGS[0]}"/>
    <Choice value="{RATINGS[1]}"/>
  </Choices>{_cluster_part() if cluster else ""}
  <TextArea name="comment" toName="{IMAGE_NAME}" placeholder="Comment (optional)" rows="2"
            maxSubmissions="1"/>
</View>"""


def _cluster_part() -> str:
    """The members' montage beside the question whom the answer applies to, so both stay in
    view under the representative."""
    choices = "".join(f'\n        <Choice value="{value}"/>' for value in APPLIES)
    return f"""
  <View style="display: flex; gap: 1em; align-items: flex-start;">
    <View style="flex: 1;">
      <Header value="Members of this cluster (a sample), with the model's explanation" size="6"/>
      <Image name="montage" value="$montage"/>
    </View>
    <View style="flex: 1;">
      <Header value="What you marked to ignore applies to:" size="6"/>
      <Choices name="{APPLIES_NAME}" toName="{IMAGE_NAME}" choice="single">{choices}
      </Choices>
    </View>
  </View>"""


def review_labeling_config() -> str:
    """A review task: one member with the mask carried to it drawn in red; one click."""
    choices = "".join(f'<Choice value="{value}"/>' for value in REVIEW_CHOICES)
    return f"""<View>
  <Header value="Should the model ignore the red region here, as in the cluster's answer?"/>
  <Text name="summary" value="$summary"/>
  <Image name="{IMAGE_NAME}" value="$image"/>
  <Choices name="{REVIEW_NAME}" toName="{IMAGE_NAME}" choice="single" showInline="true"
           required="true">{choices}</Choices>
</View>"""


def validate_labeling_config(config: str) -> list[str]:
    """What the pipeline needs from a (possibly edited) project config; empty = fine."""
    try:
        root = ET.fromstring(config)
    except ET.ParseError as err:
        return [f"labeling config is not valid XML: {err}"]
    problems = []
    rect = root.find(f".//RectangleLabels[@name='{RECTANGLES_NAME}']")
    if rect is None:
        problems.append(f"no RectangleLabels named {RECTANGLES_NAME!r}")
    else:
        values = {label.get("value") for label in rect.iter("Label")}
        problems += [
            f"RectangleLabels {RECTANGLES_NAME!r} lacks the label {label!r}"
            for label in (IGNORE_LABEL, ATTENTION_LABEL)
            if label not in values
        ]
    if root.find(f".//Image[@name='{IMAGE_NAME}']") is None:
        problems.append(f"no Image named {IMAGE_NAME!r}")
    return problems
