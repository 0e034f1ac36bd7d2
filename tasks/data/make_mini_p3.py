"""Generates mini-P3: a small synthetic instruction mixture in P3's formats.

    python tasks/data/make_mini_p3.py        # rewrites tasks/data/mini_p3/

Deterministic (fixed seeds, single-threaded SentencePiece training): running
it again reproduces the shipped files. Output:
  mini_p3/spm.model, spm.vocab    SentencePiece vocabulary (T5 ids: pad 0,
                                  eos 1, unk 2; no BOS), trained on the text
  mini_p3/tfrecord/data/<task>/   P3 TFRecord layout (info/stats JSON)
  mini_p3/parquet/<task>/         P3 Parquet layout
  mini_p3/mini_p3_tasks.tsv       task table (same columns as t0_tasks.tsv)

Datasets share skills across the train / held-out boundary, as T0's do:
  train:    movie_sentiment, news_topic, number_compare, word_copy
  held-out: product_sentiment (sentiment words of movie_sentiment, other
            nouns and prompts), headline_topic (topic words, other frames),
            number_truth (comparisons phrased as true/false statements).
Held-out datasets have validation splits, answer choices and `_score_eval`
variants (one row per example and choice), exactly like P3's.
"""

import csv
import os
import pathlib
import re
import shutil
import tempfile

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
OUT = HERE / 'mini_p3'
from mov_jax.tasks import p3_format  # pylint: disable=g-import-not-at-top

VOCAB_SIZE = 600
TRAIN_PER_TEMPLATE = 240
VALIDATION_PER_TEMPLATE = 48

POSITIVE = ['great', 'wonderful', 'excellent', 'delightful', 'brilliant',
            'superb', 'charming', 'lovely', 'fantastic', 'pleasant']
NEGATIVE = ['terrible', 'awful', 'boring', 'dreadful', 'horrible', 'dull',
            'poor', 'weak', 'disappointing', 'annoying']
INTENSIFIERS = ['really', 'very', 'truly', 'quite', 'rather', 'so']
MOVIE_NOUNS = ['film', 'movie', 'plot', 'acting', 'story', 'cast', 'ending',
               'soundtrack', 'script', 'director']
PRODUCT_NOUNS = ['phone', 'laptop', 'blender', 'camera', 'charger', 'headset',
                 'kettle', 'keyboard', 'battery', 'screen']
TOPICS = {
    'sports': ['match', 'team', 'goal', 'coach', 'player', 'stadium', 'season',
               'league', 'referee', 'trophy'],
    'food': ['recipe', 'soup', 'bread', 'chef', 'dinner', 'kitchen', 'cheese',
             'dessert', 'restaurant', 'salad'],
    'animals': ['dog', 'cat', 'horse', 'bird', 'zoo', 'puppy', 'farm', 'tiger',
                'rabbit', 'owl'],
    'weather': ['rain', 'storm', 'sun', 'wind', 'cloud', 'forecast', 'snow',
                'thunder', 'fog', 'heatwave'],
}
NAMES = ['Anna', 'Ben', 'Carla', 'David', 'Emma', 'Felix', 'Grace', 'Hugo']
COPY_WORDS = sorted({w for ws in TOPICS.values() for w in ws} |
                    set(MOVIE_NOUNS) | set(PRODUCT_NOUNS))


def _sentiment_text(rng, nouns):
  positive = bool(rng.integers(2))
  words = POSITIVE if positive else NEGATIVE
  n1, n2 = rng.choice(nouns, size=2, replace=False)
  a1, a2 = rng.choice(words, size=2, replace=False)
  text = f'the {n1} was {rng.choice(INTENSIFIERS)} {a1}'
  if rng.integers(2):
    text += f' and the {n2} was {a2}'
  return text, positive


def _topic_text(rng, frames):
  topic = sorted(TOPICS)[rng.integers(len(TOPICS))]
  w1, w2 = rng.choice(TOPICS[topic], size=2, replace=False)
  frame = frames[rng.integers(len(frames))]
  return frame.format(name=rng.choice(NAMES), w1=w1, w2=w2), topic


def _numbers(rng):
  a, b = rng.choice(100, size=2, replace=False)
  return int(a), int(b)


# Each template: (name, make(rng) -> (prompt, answer, choices or None)).
def _movie_templates():
  def pos_neg(prompt):
    def make(rng):
      text, pos = _sentiment_text(rng, MOVIE_NOUNS)
      return prompt.format(text=text), ('positive' if pos else 'negative'), [
          'negative', 'positive']
    return make

  def liked(rng):
    text, pos = _sentiment_text(rng, MOVIE_NOUNS)
    return (f'{text}. Did the critic like the film? yes or no?',
            'yes' if pos else 'no', ['no', 'yes'])

  return [('review_positive_or_negative',
           pos_neg('Review: {text}. Is this review positive or negative?')),
          ('critic_liked', liked),
          ('how_did_they_feel',
           pos_neg('Here is what someone said about a film: {text}. How did '
                   'they feel?'))]


def _product_templates():
  def happy(rng):
    text, pos = _sentiment_text(rng, PRODUCT_NOUNS)
    return (f'Customer review: {text}. Is the customer happy?',
            'yes' if pos else 'no', ['no', 'yes'])

  def pos_neg(prompt):
    def make(rng):
      text, pos = _sentiment_text(rng, PRODUCT_NOUNS)
      return prompt.format(text=text), ('positive' if pos else 'negative'), [
          'negative', 'positive']
    return make

  return [('customer_happy', happy),
          ('would_you_say', pos_neg('{text}. Would you say this review is '
                                    'positive or negative?')),
          ('product_sentiment', pos_neg('Review of a product: {text}. '
                                        'Sentiment:'))]


NEWS_FRAMES = ['{name} wrote about the {w1} and the {w2}',
               'today {name} talked about the {w1} near the {w2}',
               'the report covers the {w1} and a {w2}']
HEADLINE_FRAMES = ['{w1} and {w2} make the headlines',
                   'breaking: new {w1} surprises {w2} fans',
                   '{name} on the {w1}: the {w2} story']
TOPIC_CHOICES = sorted(TOPICS)


def _topic_templates(frames, prompts):
  def make_for(prompt):
    def make(rng):
      text, topic = _topic_text(rng, frames)
      return prompt.format(text=text), topic, list(TOPIC_CHOICES)
    return make
  return [(name, make_for(prompt)) for name, prompt in prompts]


def _compare_templates():
  def greater(rng):
    a, b = _numbers(rng)
    return f'Is {a} greater than {b}?', 'yes' if a > b else 'no', ['no', 'yes']

  def bigger_first(rng):
    a, b = _numbers(rng)
    return (f'{a} versus {b}: is the first number bigger?',
            'yes' if a > b else 'no', ['no', 'yes'])

  def smaller(rng):
    a, b = _numbers(rng)
    return f'Is {a} smaller than {b}?', 'yes' if a < b else 'no', ['no', 'yes']

  return [('is_greater', greater), ('first_bigger', bigger_first),
          ('is_smaller', smaller)]


def _truth_templates():
  def bigger(rng):
    a, b = _numbers(rng)
    return (f'True or false: {a} is bigger than {b}. Answer yes or no.',
            'yes' if a > b else 'no', ['no', 'yes'])

  def less(rng):
    a, b = _numbers(rng)
    return (f'Statement: {a} is less than {b}. Is the statement right?',
            'yes' if a < b else 'no', ['no', 'yes'])

  def larger_second(rng):
    a, b = _numbers(rng)
    return (f'Numbers {a} and {b}. Is the second one larger?',
            'yes' if b > a else 'no', ['no', 'yes'])

  return [('bigger_statement', bigger), ('less_statement', less),
          ('second_larger', larger_second)]


def _copy_templates():
  def repeat(rng):
    words = ' '.join(rng.choice(COPY_WORDS, size=rng.integers(2, 5)))
    return f'Repeat these words: {words}', words, None

  def first_word(rng):
    words = list(rng.choice(COPY_WORDS, size=rng.integers(2, 5)))
    return f'What is the first word of: {" ".join(words)}', words[0], None

  return [('repeat_words', repeat), ('first_word', first_word)]


DATASETS = [
    # (dataset, role, templates)
    ('movie_sentiment', 'train', _movie_templates()),
    ('news_topic', 'train', _topic_templates(NEWS_FRAMES, [
        ('what_topic', 'News: {text}. What is the topic?'),
        ('section', '{text}. Which section is this: sports, food, animals or '
                    'weather?'),
        ('about', 'What is this article about? {text}')])),
    ('number_compare', 'train', _compare_templates()),
    ('word_copy', 'train', _copy_templates()),
    ('product_sentiment', 'eval', _product_templates()),
    ('headline_topic', 'eval', _topic_templates(HEADLINE_FRAMES, [
        ('headline_about', 'Headline: {text}. What is this headline about?'),
        ('topic_list', '{text}. Topic (sports, food, animals or weather):'),
        ('newspaper_section', 'Which part of the newspaper would print '
                              'this: {text}?')])),
    ('number_truth', 'eval', _truth_templates()),
]


def task_name(dataset, template):
  return re.sub(r'[^\w\d._]+', '_', f'{dataset}_{template}')


def generate_examples():
  """task -> {'role', 'dataset', 'choices', 'splits': {split: [(p, a, c)]}}"""
  tasks = {}
  for d_index, (dataset, role, templates) in enumerate(DATASETS):
    for t_index, (template, make) in enumerate(templates):
      rng = np.random.default_rng(1000 * d_index + t_index)
      splits = {}
      sizes = {'validation': VALIDATION_PER_TEMPLATE}
      if role == 'train':
        sizes = {'train': TRAIN_PER_TEMPLATE, **sizes}
      for split, n in sizes.items():
        splits[split] = [make(rng) for _ in range(n)]
      tasks[task_name(dataset, template)] = {
          'role': role, 'dataset': dataset, 'splits': splits,
          'choices': splits['validation'][0][2] is not None}
  return tasks


def train_vocabulary(tasks, out_dir):
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  spm.set_random_generator_seed(0)  # with one thread, training is repeatable
  lines = []
  for task in tasks.values():
    for examples in task['splits'].values():
      for prompt, answer, choices in examples:
        lines += [prompt, answer] + list(choices or [])
  # Relative paths: the model records its input and prefix, and temporary
  # directory names would make every run's file different.
  cwd = os.getcwd()
  try:
    os.chdir(out_dir)
    pathlib.Path('corpus.txt').write_text('\n'.join(lines) + '\n')
    spm.SentencePieceTrainer.train(
        input='corpus.txt', model_prefix='spm',
        vocab_size=VOCAB_SIZE, model_type='unigram', character_coverage=1.0,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, num_threads=1,
        shuffle_input_sentence=False, input_sentence_size=0,
        hard_vocab_limit=False, minloglevel=2)
    os.remove('corpus.txt')
  finally:
    os.chdir(cwd)
  return spm.SentencePieceProcessor(model_file=str(out_dir / 'spm.model'))


def rows_for(task, split, sp):
  rows, score_rows = [], []
  for i, (prompt, answer, choices) in enumerate(task['splits'][split]):
    inputs = sp.encode(prompt) + [1]
    row = {'inputs': inputs, 'inputs_pretokenized': prompt,
           'targets': sp.encode(answer) + [1],
           'targets_pretokenized': ' ' + answer}
    if choices is not None:
      row['answer_choices'] = list(choices)
      for c, choice in enumerate(choices):
        score_rows.append({
            'inputs': inputs, 'inputs_pretokenized': prompt,
            'targets': sp.encode(choice) + [1],
            'targets_pretokenized': ' ' + choice,
            'idx': [i, c], 'is_correct': choice == answer, 'weight': 1.0})
    rows.append(row)
  return rows, score_rows


def main():
  tasks = generate_examples()
  staging = pathlib.Path(tempfile.mkdtemp(prefix='mini_p3_'))
  sp = train_vocabulary(tasks, staging)
  table = []
  for name, task in sorted(tasks.items()):
    for split in task['splits']:
      rows, score_rows = rows_for(task, split, sp)
      for layout, root in ((p3_format.TFRECORD, staging / 'tfrecord' / 'data'),
                           (p3_format.PARQUET, staging / 'parquet')):
        p3_format.write_task(str(root / name), split, rows, layout)
        if task['role'] == 'eval' and score_rows:
          p3_format.write_task(str(root / f'{name}_score_eval'), split,
                               score_rows, layout)
    n_train = len(task['splits'].get('train', []))
    table.append({'p3_task': name, 'dataset': task['dataset'],
                  'role': task['role'], 'original_task': 1,
                  'answer_choices': int(task['choices']),
                  'train_size': n_train or '',
                  'mixture_rate': n_train if task['role'] == 'train' else '',
                  'f1': 0})
  with (staging / 'mini_p3_tasks.tsv').open('w', newline='') as f:
    f.write('# mini-P3 tasks (synthetic), written by '
            'tasks/data/make_mini_p3.py; same columns as t0_tasks.tsv.\n')
    writer = csv.DictWriter(f, list(table[0]), delimiter='\t',
                            lineterminator='\n')
    writer.writeheader()
    writer.writerows(table)
  if OUT.exists():
    shutil.rmtree(OUT)
  shutil.move(str(staging), str(OUT))
  size = sum(p.stat().st_size for p in OUT.rglob('*') if p.is_file())
  print(f'wrote {len(tasks)} tasks ({sp.get_piece_size()} pieces) to {OUT}: '
        f'{size / 1e6:.2f} MB')


if __name__ == '__main__':
  main()
