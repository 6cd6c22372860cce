"""What the tiny model's build starts from, shared by the build (models/__init__.py) and the
training (models/train.py): the seed of its weights and the text its tokenizer learns."""

# torch.manual_seed of the random initial weights (and of the training's own random state).
SEED = 0

# Text the tokenizer is trained on: plain English of the kind captions and prompts are made of.
TOKENIZER_CORPUS = """\
A photograph of a small red boat resting on the sand of a quiet beach at sunset. The sky is
orange and pink, and long shadows stretch from the boat toward the calm blue water. Two gulls
stand near the edge of the waves, and a line of low green hills rises in the distance.

The image shows a busy city street on a rainy evening. People with black umbrellas cross at a
striped crosswalk while yellow taxis wait at the traffic light. Shop windows glow with warm
light, and the wet pavement reflects the signs, the headlights and the tall grey buildings.

In this picture a brown dog with white paws is running across a green field, holding a blue
ball in its mouth. Behind the dog there is a wooden fence, a large oak tree and a farmhouse
with a red roof. The grass is bright and the afternoon sun makes everything look soft.

Describe this image in one detailed sentence. What objects can you see, and where are they?
Please write a short caption for the photo. Count the people in the scene. Is it day or night?
Which colours stand out most? Answer the question briefly and do not repeat yourself.

A close view of a kitchen table with a white plate of fresh fruit: green apples, yellow
bananas, purple grapes and a sliced orange. A glass of water, a silver knife and a folded
napkin lie beside the plate. Morning light comes through a window on the left side.

An astronaut in a white space suit floats above the curved edge of the Earth. The planet below
is covered with clouds and deep blue oceans, and the thin bright layer of the atmosphere
separates it from the black sky. A robotic arm and parts of a space station are visible.

The microscope image shows round cells with dark purple centres on a pale pink background.
Some cells are grouped in clusters, others are spread out, and a few thin fibres cross the
field of view from the upper right corner to the lower left corner.

An old black and white portrait of a man wearing a hat and a coat, standing in front of a
brick wall. His face is serious, his hands are in his pockets, and a bicycle leans against
the wall next to him. The edges of the photo are slightly faded and scratched.

A satellite view of farmland: square fields in shades of green, brown and gold, divided by
narrow roads and a winding river. Small villages appear as clusters of white and grey roofs,
and a forest covers the hills in the north of the frame.

A cat sleeps on a windowsill next to a pot of flowers. Outside the window there are trees,
a parked car and a child riding a scooter down the road. Numbers 1, 2, 3, 10, 42, 100 and
2024 appear on a calendar, a clock shows 7:30, and a sign reads "Open 9am - 5pm".

Shapes on a plain background: a red circle and a blue square on a white background; a green
triangle on a black background; a yellow star and a purple circle on a gray background; an
orange square and an orange triangle on a white background; a purple star on a black background.
"""
