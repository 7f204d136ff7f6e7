"""tailmon.check: the release gate (`tailmon check`) and input sensitivity (`tailmon sensitivity`).

* `gate`: candidate and baseline estimated with the monitor's own plan on common random numbers,
  the absolute gates and the paired regression test.
* `sensitivity`: perturbed variants of every prompt (typos, case, whitespace, jailbreak wrappers,
  paraphrases) estimated on the model under test.
* `report`: Markdown, JUnit XML, plots and the plain-text table of both.
"""
