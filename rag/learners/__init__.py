"""Learners and their courses: progress and module gating, feedback, the activity record,
insights, history lists.
"""
