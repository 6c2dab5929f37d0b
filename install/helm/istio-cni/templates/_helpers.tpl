{{/*
The effective values: chart defaults < profile < user values (Istio's layering).
Use as: {{- $v := include "istio-cni.values" . | fromYaml }}
*/}}
{{- define "istio-cni.values" -}}
{{- $defaults := deepCopy (index .Values "_internal_defaults_do_not_set") -}}
{{- $profile := dict -}}
{{- if .Values.profile -}}
{{- $file := printf "files/profile-%s.yaml" .Values.profile -}}
{{- $raw := .Files.Get $file -}}
{{- if not $raw -}}
{{- fail (printf "unknown profile %q: no %s in the chart" .Values.profile $file) -}}
{{- end -}}
{{- $profile = fromYaml $raw -}}
{{- end -}}
{{- $user := omit .Values "_internal_defaults_do_not_set" "profile" -}}
{{- mustMergeOverwrite $defaults $profile (deepCopy $user) | toYaml -}}
{{- end -}}

{{- define "istio-cni.labels" -}}
app: istio-cni
app.kubernetes.io/name: istio-cni
app.kubernetes.io/part-of: istio
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end -}}
