"""The compiled bar loop of :mod:`moondev_lab.fast`: a spec strategy's ``next()``, driving the trusted broker.

Fill rules live in one place, :mod:`moondev_lab._broker_kernel` (backtesting.py 0.6.6's
``_Broker``). This loop only *decides*, exactly as the offline model's generated
``Strategy.next()`` does at each bar (see ``models/_codegen._next_method``), and hands each
decision to the broker kernel's ``apply_event``, after its ``next_bar`` filled the bar.
Every decision is also written to an event log (the :class:`~moondev_lab.broker.OrderLog`
format), so any combination can be settled again in full by :func:`moondev_lab.broker.settle`.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

from . import _broker_kernel  # noqa: F401 - sets numba's cache dir under $MOONDEV_LAB_HOME first
from ._broker_kernel import (A_CASH, C_NACTIVE, C_NCLOSED, C_NQ, C_NTRADES, E_CANCEL, E_CLOSE, E_CONTINGENT, E_NEW,
                             NEED_ROOM, OK, OUT_OF_MONEY, T_COMM, T_ENTRY, T_ENTRY_BAR, T_EXIT, T_SIZE, T_SL,
                             T_SL_ORD, T_TAG, _close_order_size, _equity, apply_event, finalize, next_bar,
                             room)

#: Stop kinds (``Stop.kind``): none, a percent of the price, a multiple of ATR.
STOP_NONE, STOP_PCT, STOP_ATR = 0, 1, 2
#: A decision backtesting.py would have raised on (ValueError/AssertionError in the strategy).
STRATEGY_ERROR = -10
#: The event log is full (the caller gives it more room and runs the combination again).
LOG_FULL = 3
#: What :func:`run_combo` measures, in this order.
METRICS = ("Return [%]", "Equity Final [$]", "Equity Peak [$]", "Max. Drawdown [%]", "# Trades", "Win Rate [%]")


@njit(cache=True)
def _log(ev_bar, ev_kind, ev_size, ev_limit, ev_stop, ev_sl, ev_tp, ev_ref, nev, bar, kind, size, limit, stop,
         sl, tp, ref):
    k = nev[0]
    ev_bar[k] = bar
    ev_kind[k] = kind
    ev_size[k] = size
    ev_limit[k] = limit
    ev_stop[k] = stop
    ev_sl[k] = sl
    ev_tp[k] = tp
    ev_ref[k] = ref
    nev[0] = k + 1


@njit(cache=True)
def _close_position(qf, qi, tf, ti, active, cnt, price, spread, exclusive, bar,
                    ev_bar, ev_kind, ev_size, ev_limit, ev_stop, ev_sl, ev_tp, ev_ref, nev):
    """``self.position.close()``: one ``Trade.close()`` order per open trade, oldest first, each logged."""
    nan = np.nan
    for k in range(cnt[C_NACTIVE]):
        t = active[k]
        csize = _close_order_size(tf[t, T_SIZE])
        apply_event(qf, qi, tf, ti, active, cnt, E_CLOSE, csize, nan, nan, nan, nan, t, -1, price, spread, exclusive)
        _log(ev_bar, ev_kind, ev_size, ev_limit, ev_stop, ev_sl, ev_tp, ev_ref, nev, bar, E_CLOSE, csize,
             nan, nan, nan, nan, t)


@njit(cache=True)
def _stop_price(kind, value, price, atr_i, side, away):
    """``_codegen._stop_expr``: ``price -/+ value * atr`` or ``price * (1 -/+ value / 100)``.

    ``away`` is -1 for a stop-loss, +1 for a take-profit; with ``side`` (+1 long, -1 short)
    it says whether the level sits below the price.
    """
    below = side * away < 0
    if kind == STOP_ATR:
        return price - value * atr_i if below else price + value * atr_i
    return price * (1 - value / 100) if below else price * (1 + value / 100)


@njit(cache=True, error_model="numpy")  # 0/0 is NaN, as in compute_stats' numpy, not an exception
def run_combo(O, H, L, C, long_setup, short_setup, exit_long, exit_short, atr, start, allow_long, allow_short,
              size, sl_kind, sl_value, sl_trailing, tp_kind, tp_value, max_bars, has_max_bars, need_atr,
              qf, qi, tf, ti, active, closed, cnt, acc,
              spread, fixed, rel, leverage, toc, hedging, exclusive, do_finalize, equity,
              ev_bar, ev_kind, ev_size, ev_limit, ev_stop, ev_sl, ev_tp, ev_ref, nev, metrics):
    """``Backtest.run`` of one combination. Returns a status (``OK``, ``OUT_OF_MONEY``, or a failure)."""
    n = len(C)
    nan = np.nan
    cap = len(ev_bar)
    stopped = False
    for i in range(start, n):
        eq = _equity(tf, active, cnt, acc, C[i]) if cnt[C_NQ] == 0 else 0.0
        if eq > 0:  # nothing to fill: the broker only marks equity (most bars), as run_bars does
            equity[i] = eq
        else:
            if not room(qf, tf, cnt, 1):
                return NEED_ROOM
            status, eq = next_bar(qf, qi, tf, ti, active, closed, cnt, acc, O[i], H[i], L[i], C[i], C[i - 1], i,
                                  spread, fixed, rel, leverage, toc, hedging)
            if status == OUT_OF_MONEY:
                equity[i:] = 0.0
                stopped = True
                break
            if status != OK:
                return status
            equity[i] = eq
        # ---- Strategy.next() at bar i (len(self.data) == i + 1)
        if i < 2 or nev[0] + 2 * cnt[C_NACTIVE] + 2 > cap:
            if i >= 2:
                return LOG_FULL
            continue
        price = C[i]
        if has_max_bars and cnt[C_NACTIVE] > 0 and i - ti[active[0], T_ENTRY_BAR] >= max_bars:  # held too long
            _close_position(qf, qi, tf, ti, active, cnt, price, spread, exclusive, i,
                            ev_bar, ev_kind, ev_size, ev_limit, ev_stop, ev_sl, ev_tp, ev_ref, nev)
            continue
        if sl_trailing:  # for trade in self.trades: trade.sl = max(trade.sl or 0.0, ...) (only ever tightens)
            for k in range(cnt[C_NACTIVE]):
                if sl_kind == STOP_ATR and not math.isfinite(atr[i]):
                    break
                t = active[k]
                cur = tf[t, T_SL]
                if tf[t, T_SIZE] > 0:
                    cur = cur if (not math.isnan(cur) and cur != 0.0) else 0.0
                    new = _stop_price(sl_kind, sl_value, price, atr[i], 1.0, -1.0)
                    value = new if new > cur else cur
                else:
                    cur = cur if (not math.isnan(cur) and cur != 0.0) else np.inf
                    new = _stop_price(sl_kind, sl_value, price, atr[i], -1.0, -1.0)
                    value = new if new < cur else cur
                if not (0 < value < np.inf):
                    return STRATEGY_ERROR  # Trade.sl's assert
                o = ti[t, T_SL_ORD]
                if o >= 0:  # the old SL order is cancelled first
                    status = apply_event(qf, qi, tf, ti, active, cnt, E_CANCEL, 0.0, nan, nan, nan, nan, o, -1,
                                         price, spread, exclusive)
                    if status != OK:
                        return status
                    _log(ev_bar, ev_kind, ev_size, ev_limit, ev_stop, ev_sl, ev_tp, ev_ref, nev, i, E_CANCEL, 0.0,
                         nan, nan, nan, nan, o)
                status = apply_event(qf, qi, tf, ti, active, cnt, E_CONTINGENT, -tf[t, T_SIZE], nan, value, nan,
                                     nan, t, ti[t, T_TAG], price, spread, exclusive)
                if status != OK:
                    return STRATEGY_ERROR
                _log(ev_bar, ev_kind, ev_size, ev_limit, ev_stop, ev_sl, ev_tp, ev_ref, nev, i, E_CONTINGENT,
                     -tf[t, T_SIZE], nan, value, nan, nan, t)
        position = 0.0
        for k in range(cnt[C_NACTIVE]):
            position += tf[active[k], T_SIZE]
        if (position > 0 and exit_long[i]) or (position < 0 and exit_short[i]):
            _close_position(qf, qi, tf, ti, active, cnt, price, spread, exclusive, i,
                            ev_bar, ev_kind, ev_size, ev_limit, ev_stop, ev_sl, ev_tp, ev_ref, nev)
        if position != 0:
            continue
        if need_atr and (not math.isfinite(atr[i]) or atr[i] <= 0):
            continue
        side = 0.0
        if allow_long and long_setup[i] and not long_setup[i - 1]:
            side = 1.0
        elif allow_short and short_setup[i] and not short_setup[i - 1]:
            side = -1.0
        if side == 0.0:
            continue
        sl = _stop_price(sl_kind, sl_value, price, atr[i], side, -1.0) if sl_kind != STOP_NONE else nan
        tp = _stop_price(tp_kind, tp_value, price, atr[i], side, 1.0) if tp_kind != STOP_NONE else nan
        status = apply_event(qf, qi, tf, ti, active, cnt, E_NEW, side * size, nan, nan, sl, tp, -1, -1, price,
                             spread, exclusive)
        if status != OK:
            return STRATEGY_ERROR  # new_order's ValueError (SL < price < TP)
        _log(ev_bar, ev_kind, ev_size, ev_limit, ev_stop, ev_sl, ev_tp, ev_ref, nev, i, E_NEW, side * size,
             nan, nan, sl, tp, -1)
    if not stopped and do_finalize and start < n:
        if not room(qf, tf, cnt, cnt[C_NACTIVE]):
            return NEED_ROOM
        finalize(qf, qi, tf, ti, active, cnt)
        status, eq = next_bar(qf, qi, tf, ti, active, closed, cnt, acc, O[n - 1], H[n - 1], L[n - 1], C[n - 1],
                              C[n - 2] if n > 1 else C[n - 1], n - 1, spread, fixed, rel, leverage, toc, hedging)
        if status == OUT_OF_MONEY:
            equity[n - 1:] = 0.0
            stopped = True
        elif status != OK:
            return status
        else:
            equity[n - 1] = eq
    # pd.Series(broker._equity).bfill().fillna(broker._cash)
    first = -1
    for i in range(n):
        if not math.isnan(equity[i]):
            first = i
            break
    fill = equity[first] if first >= 0 else acc[A_CASH]
    for i in range(first if first >= 0 else n):
        equity[i] = fill
    # compute_stats' numbers for these metrics, in its order of operations
    metrics[0] = (equity[n - 1] - equity[0]) / equity[0] * 100
    metrics[1] = equity[n - 1]
    peak = -np.inf  # equity.max(); the drawdown: 1 - equity / np.maximum.accumulate(equity), its max (NaN-propagating)
    worst = -np.inf
    for i in range(n):
        peak = equity[i] if equity[i] > peak else peak
        dd = 1 - equity[i] / peak
        if math.isnan(dd) or math.isnan(worst):
            worst = np.nan
        elif dd > worst:
            worst = dd
    metrics[2] = peak
    metrics[3] = -(0.0 if math.isnan(worst) else worst) * 100
    n_closed = cnt[C_NCLOSED]
    metrics[4] = n_closed
    wins = 0
    for k in range(n_closed):
        t = closed[k]
        pl = tf[t, T_SIZE] * (tf[t, T_EXIT] - tf[t, T_ENTRY]) - tf[t, T_COMM]
        if pl > 0:
            wins += 1
    metrics[5] = wins / n_closed * 100 if n_closed else np.nan
    return OUT_OF_MONEY if stopped else OK


@njit(cache=True)
def reset(qf, qi, tf, ti, active, closed, cnt, acc, cash, equity, nev):
    """An empty broker with ``cash``, and an empty equity curve and event log (buffers are reused)."""
    qf[:] = np.nan
    qi[:] = -1
    ntr = cnt[C_NTRADES] + 2
    tf[:ntr] = np.nan
    ti[:ntr] = -1
    active[:] = -1
    closed[:] = -1
    cnt[:] = 0
    acc[:] = 0.0
    acc[A_CASH] = cash
    equity[:] = np.nan
    nev[0] = 0
