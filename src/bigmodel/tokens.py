"""The special token ids, defined once: the tokenizers (data/) put them in, the models (models/) rely on them.

Every bigmodel tokenizer reserves the same first ids: [PAD] 0, [UNK] 1, [CLS] 2, [SEP] 3. Translation targets start
with [CLS] (BOS) and end with [SEP] (EOS). Models import these from here, never from data/.
"""

PAD_ID, UNK_ID, CLS_ID, SEP_ID = 0, 1, 2, 3
BOS_ID, EOS_ID = CLS_ID, SEP_ID  # translation: [CLS] starts and [SEP] ends every target
