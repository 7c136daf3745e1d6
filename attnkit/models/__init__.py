"""Model families: one small file each, composing attnkit.layers. ``FAMILIES`` maps
``ModelConfig.family`` to the class that builds it."""

from attnkit.models.decoder import DecoderLM
from attnkit.models.encoder import EncoderModel
from attnkit.models.recurrent import GRULM
from attnkit.models.seq2seq import Seq2SeqModel
from attnkit.models.wavenet import WaveNet

FAMILIES = {"decoder": DecoderLM, "encoder": EncoderModel, "seq2seq": Seq2SeqModel, "gru": GRULM,
            "wavenet": WaveNet}
